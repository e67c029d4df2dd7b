"""Per-step cost of the default `dictlearn compare` sweep: where a member-step's time goes.

Builds one seed's sweep exactly as `dictlearn compare` plans it on a CPU (7 architectures × L0
8/16/32 = 21 members, d_sae 512, batch 1024, its optimiser, calibration and logging interval, the
default run length, which sets the schedules) on a synthetic 128-wide file with a target, trains
`--warmup` steps, then times `--steps` steps through `Trainer.fit` (no validation or checkpoints in
the timed window: they are per-run costs, not per-step). Prints, for the timed steps:

* wall ms per sweep step and per member-step, member-tokens/s;
* achieved GFLOP/s of the useful FLOPs (docs/performance.md, "FLOP model of a compare sweep")
  against two matmul rates measured in this process: compare's 1024² fp32 rate (what
  timings.json records) and the step's own encoder GEMM shape;
* the projection of the sweep's training time to a machine that reads 85 GFLOP/s.

    python benchmarks/compare_budget.py                 # ~1 min on 2 cores
    python benchmarks/compare_budget.py --profile       # + the top torch.profiler / cProfile entries per step
    python benchmarks/compare_budget.py --stack both --sparse-path never   # one by one and stacked, alternated
    python benchmarks/compare_budget.py --architectures topk --profile     # one architecture's three members

Members stack only on the dense path (training/stack.py), which compare's d_sae 512 members leave
by default: `--stack` needs `--sparse-path never`.
    python benchmarks/compare_budget.py --workers 3     # 3 sweeps at once in spawned processes (compare --workers):
                                                        # aggregate member-tokens/s and each worker's start-up

Measure on a quiet machine (`uptime`); on a shared one, compare runs interleaved in the same
minutes and report ratios.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from dictlearn.callbacks import KeepFreedMemory
from dictlearn.compare.plan import CompareConfig, plan
from dictlearn.compare.results import matmul_gflops
from dictlearn.data import ActivationDataModule
from dictlearn.data.synth import write_synth_file
from dictlearn.training import DictionaryTraining, Member, TrainingConfig
from dictlearn.training.calibration import SparsityCalibration

D = 128


def build(data: Path, stack: bool = False, architectures: list[str] | None = None, sparse_path: str | None = None):
    """(config, planned members of seed 0, DictionaryTraining, SparsityCalibration) as compare builds
    them; `stack`: members of one mechanism and shape as one computation (training/stack.py);
    `architectures`: only these (None: compare's default seven); `sparse_path`: every member's
    `TrainingConfig.sparse_path` (None: compare's)."""
    config = CompareConfig(data=str(data), input_key="acts", target_key="target", seeds=[0],
                           architectures=architectures).resolved()
    group = plan(config)
    paths = {} if sparse_path is None else {"sparse_path": sparse_path}
    members = {p.name: Member(p.build(D, D), "acts", "target" if p.mapping != "sae" else None, seed=p.seed,
                              training=TrainingConfig(**p.training, **paths)) for p in group}
    calibration = SparsityCalibration({p.name: p.l0_target for p in group if p.calibrated}, **config.calibration)
    return config, group, DictionaryTraining(members, stack=stack), calibration


class StepClock(L.Callback):
    """Wall time of the steps after `warmup`; stops the run after `warmup + steps` (the run's
    length, which sets every schedule, stays compare's). Optionally profiles the timed steps."""

    def __init__(self, warmup: int, steps: int, profile: bool) -> None:
        self.warmup, self.steps, self.profile = warmup, steps, profile
        self.seconds, self.cpu_seconds, self.profilers = 0.0, 0.0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            if self.profile:
                self.profilers = (torch.profiler.profile(), cProfile.Profile())
                self.profilers[0].__enter__()
                self.profilers[1].enable()
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup + self.steps:
            self.seconds = time.perf_counter() - self.started
            self.cpu_seconds = time.process_time() - self.cpu_started
            if self.profilers:
                self.profilers[1].disable()
                self.profilers[0].__exit__(None, None, None)
            trainer.should_stop = True


def useful_flops_per_token(group, l0: dict[str, float]) -> float:
    """Sum over members of the FLOP model (docs/performance.md): the encoder's dense GEMMs (forward
    and ∂W_enc: 4·d_in·d_sae), the decoder on the active latents (forward, ∂z, ∂W_dec: 6·L0·d_out),
    a skip transcoder's W_skip (forward and gradient: 4·d_in·d_out)."""
    total = 0.0
    for p in group:
        total += 4 * D * p.d_sae + 6 * l0[p.name] * D + (4 * D * D if p.mapping == "skip_transcoder" else 0)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="timed steps (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    parser.add_argument("--data", type=Path, default=None, help="an HDF5 file with 'acts' and 'target' [rows, 128]")
    parser.add_argument("--profile", action="store_true", help="print the top torch.profiler and cProfile entries")
    parser.add_argument("--top", type=int, default=25, help="entries printed per profiler (default 25)")
    parser.add_argument("--stack", choices=("off", "on", "both"), default="off",
                        help="train members of one mechanism and shape stacked (training/stack.py); both: "
                             "alternate one-by-one and stacked runs in this process and print their ratio")
    parser.add_argument("--rounds", type=int, default=2, help="with --stack both: pairs of runs (default 2)")
    parser.add_argument("--workers", type=int, default=1,
                        help="train this many sweeps at once, each in a spawned process with max(1, threads // N) "
                             "torch threads, as `dictlearn compare --workers N` does; prints the aggregate rate")
    parser.add_argument("--sparse-path", choices=("auto", "always", "never"), default=None,
                        help="every member's --training.sparse_path (default: compare's, auto)")
    parser.add_argument("--architectures", default=None,
                        help="comma-separated: time only these architectures' members (default: compare's seven)")
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="dictlearn_compare_budget_"))
    data = args.data or work / "acts.h5"
    if args.data is None:
        write_synth_file(data, n_rows=1024 * (args.warmup + args.steps + 20), d=D, n_features=1024,
                         mean_active=8, d_out=D)
    if args.workers > 1:
        return in_workers(args, data, work)
    matmul = matmul_gflops()
    if args.stack != "both":
        config, group, module, clock = fit(args, data, work, args.stack == "on")
        report(args, config, group, module, clock, matmul, step_gemm_gflops(config.batch_size, group[0].d_sae))
        return
    seconds = {False: [], True: []}
    for round_ in range(args.rounds):  # alternated, so that a change of load falls on both
        for stack in (False, True):
            seconds[stack].append(fit(args, data, work, stack)[3].seconds / args.steps)
            print(f"round {round_ + 1}: {'stacked' if stack else 'one by one'} {1e3 * seconds[stack][-1]:.1f} ms "
                  "per sweep step", flush=True)
    alone, stacked = (sorted(seconds[s])[len(seconds[s]) // 2] for s in (False, True))
    print(f"median step: one by one {1e3 * alone:.1f} ms, stacked {1e3 * stacked:.1f} ms; stacked is "
          f"{alone / stacked:.2f}x (load {os.getloadavg()[0]:.2f}; a ratio from one process, not a quiet timing)")


def in_workers(args, data: Path, work: Path) -> None:
    """`args.workers` sweeps trained at once in spawned processes: each one's step time and start-up
    (spawn to its first import done), and the member-tokens/s of all together."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // args.workers)
    results = context.Queue()
    started = time.perf_counter()
    processes = [context.Process(target=_worker, args=(args, data, work / f"worker{i}", threads, started, results))
                 for i in range(args.workers)]
    for process in processes:
        process.start()
    rows = [results.get() for _ in processes]
    for process in processes:
        process.join()
    rate = sum(row["member_tokens_per_s"] for row in rows)
    for i, row in enumerate(rows):
        print(f"worker {i}: start-up {row['startup_s']:.1f} s, step {1e3 * row['step_s']:.1f} ms, "
              f"{row['member_tokens_per_s']:,.0f} member-tokens/s, process CPU {1e3 * row['cpu_step_s']:.1f} ms/step")
    print(f"{args.workers} workers x {threads} threads: {rate:,.0f} member-tokens/s together "
          f"(load {os.getloadavg()[0]:.2f}; run one process in the same minutes to compare)")


def _worker(args, data: Path, work: Path, threads: int, started: float, results) -> None:
    startup = time.perf_counter() - started  # this module and its imports (torch, Lightning) are loaded
    torch.set_num_threads(threads)
    work.mkdir(parents=True)
    config, group, module, clock = fit(args, data, work, args.stack == "on")
    step_s = clock.seconds / args.steps
    results.put({"startup_s": startup, "step_s": step_s, "cpu_step_s": clock.cpu_seconds / args.steps,
                 "member_tokens_per_s": len(group) * config.batch_size / step_s})


def fit(args, data: Path, work: Path, stack: bool):
    """Build the sweep and train it for warmup + steps steps; -> (config, group, module, StepClock)."""
    architectures = args.architectures.split(",") if args.architectures else None
    config, group, module, calibration = build(data, stack, architectures, args.sparse_path)
    clock = StepClock(args.warmup, args.steps, args.profile)
    trainer = L.Trainer(
        max_steps=config.steps, max_epochs=-1, accelerator="cpu", devices=1, precision="32-true",
        gradient_clip_val=1.0, logger=L.pytorch.loggers.CSVLogger(save_dir=str(work), name="logs"),
        callbacks=[calibration, clock, KeepFreedMemory()], log_every_n_steps=max(1, min(50, config.steps // 20)),
        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(work),
    )  # fmt: skip
    datamodule = ActivationDataModule(str(data), input_key="acts", batch_size=config.batch_size, seed=0)
    trainer.fit(module, datamodule)
    return config, group, module, clock


def step_gemm_gflops(batch: int, d_sae: int, repeats: int = 50) -> float:
    """fp32 rate of the encoder's own GEMM shape ([batch, 128] @ [128, d_sae] + bias), best of `repeats`."""
    x, w, b = torch.randn(batch, D), torch.randn(D, d_sae), torch.randn(d_sae)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.addmm(b, x, w)
        best = min(best, time.perf_counter() - start)
    return 2 * batch * D * d_sae / best / 1e9


def report(args, config, group, module, clock, matmul: float, matmul_step: float) -> None:
    n, steps, batch = len(group), args.steps, config.batch_size
    l0 = {name: float(value) for name, value in module.last_step_l0.items()}
    step_s = clock.seconds / steps
    flops = useful_flops_per_token(group, l0) * batch
    achieved = flops / step_s / 1e9
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"sweep: {n} members of d_in {D} x d_sae {group[0].d_sae}, batch {batch}, {steps} timed steps after "
          f"{args.warmup} (run length {config.steps})")
    print(f"step {1e3 * step_s:.1f} ms; per member-step {1e3 * step_s / n:.2f} ms; "
          f"{n * batch / step_s:,.0f} member-tokens/s; process CPU time {1e3 * clock.cpu_seconds / steps:.1f} ms "
          "per step (less sensitive than wall time to other load)")
    print(f"useful FLOPs {flops / n / batch / 1e6:.3f} MFLOP per member-token; achieved {achieved:.1f} GFLOP/s = "
          f"{100 * achieved / matmul:.0f} % of the 1024² matmul rate {matmul:.1f} GFLOP/s "
          f"({100 * achieved / matmul_step:.0f} % of the step's GEMM shape, {matmul_step:.1f} GFLOP/s)")
    train_s = step_s * config.steps
    # The projection assumes the step's time scales with the matmul rate. It does not where the
    # GEMMs are a small part of it: a Xeon that reads 1.8x the AMD EPYC's rate ran the default
    # compare 1.2x slower (benchmarks/RESULTS.md, eighth session). Read it as the rule only.
    print(f"one seed's sweep ({config.steps} steps): {train_s:.0f} s here, {train_s * matmul / 85:.0f} s projected "
          f"to 85 GFLOP/s (time scaled by {matmul:.0f}/85: valid only as far as the step is GEMM-bound)")
    if clock.profilers:
        print(f"\n--- torch.profiler, self CPU time per step (of {steps} steps)")
        averages = clock.profilers[0].key_averages()
        for event in sorted(averages, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            print(f"{event.self_cpu_time_total / steps / 1e3:8.2f} ms {event.count / steps:7.1f} calls  {event.key}")
        print_categories(averages, steps, n, clock.seconds, clock.cpu_seconds)
        print(f"\n--- cProfile, cumulative time per step (of {steps} steps; includes the profiler's overhead)")
        stats = pstats.Stats(clock.profilers[1])
        rows = sorted(stats.stats.items(), key=lambda item: -item[1][3])[: args.top]
        for (file, line, name), (_, calls, own, cumulative, _) in rows:
            where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
            print(f"{cumulative / steps * 1e3:8.2f} ms cum {own / steps * 1e3:7.2f} ms own {calls / steps:7.1f} calls  "
                  f"{name} ({where})")


CATEGORIES = {  # aten op -> the part of a member-step it belongs to
    "aten::mm": "GEMMs", "aten::addmm": "GEMMs", "aten::bmm": "GEMMs", "aten::baddbmm": "GEMMs",
    "aten::topk": "top-k", "aten::_fused_adam_": "fused Adam", "aten::_foreach_norm": "clipping norms",
    "aten::copy_": "copies, fills", "aten::fill_": "copies, fills", "aten::zero_": "copies, fills",
}


def print_categories(averages, steps: int, n: int, wall_seconds: float, cpu_seconds: float) -> None:
    """Shares of the profiled steps' wall time per part of a member-step: op self times by
    `CATEGORIES` (other aten ops: elementwise passes and reductions), and what no op covers
    (Python, dispatch, autograd's engine, Lightning's loop); each share is also given as ms of the
    process CPU time per member-step (the profiler's intervals are wall time, which other load
    inflates evenly; CPU time is what one thread spends)."""
    totals: dict[str, float] = {}
    for event in averages:
        if event.key.startswith("aten::"):
            part = CATEGORIES.get(event.key, "other ops (elementwise, reductions, gathers)")
            totals[part] = totals.get(part, 0.0) + event.self_cpu_time_total / 1e6
    totals["no op: Python, dispatch, autograd engine, Lightning"] = wall_seconds - sum(totals.values())
    cpu_ms = 1e3 * cpu_seconds / steps / n
    print(f"\n--- per member-step ({n} members): share of the wall time, and that share of {cpu_ms:.2f} ms CPU")
    for part, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"{100 * seconds / wall_seconds:6.1f} %  {cpu_ms * seconds / wall_seconds:6.2f} ms  {part}")


if __name__ == "__main__":
    main()
