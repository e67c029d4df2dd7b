"""Training throughput of every dictlearn architecture, dense and sparse paths, and its peers, in one run.

Standard workload: d_in 512, d_sae 4096, k 32, batch 4096 tokens, fp32. Each run trains
through the path a user gets (`Trainer.fit` on an HDF5 file through `ActivationDataModule`, metrics
and logging on, gradient clipping 1.0): `--warmup` steps, then the median of `--steps` timed steps.
Every (architecture, path) runs in its own subprocess so its peak memory can be measured.

Peers: with the `bench` extra installed (SAELens, sparsify; `benchmarks/install_peers.sh` adds
dictionary_learning in a separate venv), the same workload also runs through each peer's own
model, loss and optimiser step, one subprocess per (peer, architecture); benchmarks/peers.py says
how each step mirrors its trainer. A peer that is not installed is skipped with a note. The runs of
an architecture (dense, automatic, then the peers) alternate their order between architectures.
The last lines give dictlearn's automatic path over the fastest peer of the same architecture.

    python benchmarks/throughput.py                       # the standard workload on CPU
    python benchmarks/throughput.py --smoke               # 2 steps per run: does it all work?
    python benchmarks/throughput.py --paths none          # the peers only
    python benchmarks/throughput.py --peers none          # dictlearn only
    python benchmarks/throughput.py --device cuda --d-in 768 --d-sae 24576 --k 32 --dtype bf16
    python benchmarks/throughput.py --check-cli           # `dictlearn fit` against the benchmark

Columns: tokens/s, median step, achieved GFLOP/s of the dense-equivalent step (12·d_in·d_sae
FLOPs per token, whatever the path actually computes) against the measured matmul peak, the
training's peak memory (CPU: max-RSS growth of the subprocess during `fit` or the peer's steps;
CUDA: `max_memory_allocated`), the mean L0 and the fraction of steps that took the sparse path.

Threshold mechanisms (ReLU-L1, gated, JumpReLU) are dense at initialisation and sparse once
trained; their sparse path is chosen per batch. With `--trained-sparsity` (default on) their
biases / thresholds are set at the start so every latent fires on a fraction k/d_sae of tokens,
the state of a trained dictionary at L0 ≈ k; `--no-trained-sparsity` measures the
initialisation (dense) state. The peers train from their own initialisation: their steps are
dense matmuls, whose cost does not depend on the L0.

The dictlearn workers tune glibc malloc as `dictlearn fit` does (`dictlearn/runtime.py`: freed
large blocks stay in the heap); the peers' processes run with the allocator as their users get it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import peers
from measure import PeakMemory

ARCHITECTURES = ("relu_l1", "topk", "batchtopk", "gated", "jumprelu")
PATHS = ("never", "auto")  # dense reference, then what a user gets


# --------------------------------------------------------------------- one run (in a subprocess)
def build(name: str, d_in: int, d_sae: int, k: int, sparse_path: str, initial_l0: float | None = None):
    """-> a Member: the dictionary and its training settings."""
    from dictlearn import BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUL1SAE, TopKSAE
    from dictlearn.training import Member, TrainingConfig

    common = dict(d_in=d_in, d_sae=d_sae)
    # threshold mechanisms only: k sets TopK's L0
    start = dict(initial_l0=initial_l0) if name in ("relu_l1", "gated", "jumprelu") else {}
    model = {
        "relu_l1": lambda: ReLUL1SAE(**common),
        "topk": lambda: TopKSAE(k=k, **common),
        "batchtopk": lambda: BatchTopKSAE(k=k, **common),
        "gated": lambda: GatedSAE(**common),
        "jumprelu": lambda: JumpReLUSAE(**common),
    }[name]()
    return Member(model, training=TrainingConfig(sparse_path=sparse_path, **start))


def _callbacks(warmup: int, k: int, trained_sparsity: bool):
    import lightning as L
    import torch

    class StepTimer(L.Callback):
        """Wall time of each training step (batch fetch included), after `warmup` steps."""

        def __init__(self):
            self.times, self._start = [], None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._sync(pl_module)
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._sync(pl_module)
            if trainer.global_step > warmup:
                self.times.append(time.perf_counter() - self._start)

        @staticmethod
        def _sync(pl_module):
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()

    class SparsityProbe(L.Callback):
        """Counts the steps that took the sparse path; sets a trained-like sparsity at the start."""

        def __init__(self):
            self.sparse_steps = self.steps = 0
            self.l0_sum = 0.0  # the training steps' own L0 (the density metric resets every dead window)

        def on_train_start(self, trainer, pl_module):
            model = pl_module.dictionary
            if trained_sparsity and model.sparse_l0() is None:
                _set_trained_sparsity(model, trainer.datamodule, k)
            # the step's path is `training_latents`' choice (dictionaries/latents.py): count the
            # steps whose latents came back sparse (this worker process runs one dictionary)
            import dictlearn.dictionaries.model as model_module
            from dictlearn.dictionaries.latents import SparseLatents

            original = model_module.training_latents

            def counting(dictionary, x, sparse_path="auto"):
                latents, values = original(dictionary, x, sparse_path)
                self.sparse_steps += isinstance(latents, SparseLatents)
                return latents, values

            model_module.training_latents = counting

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps += 1
            self.l0_sum += float(pl_module.last_step_l0["model"])

    return StepTimer(), SparsityProbe()


def _set_trained_sparsity(model, datamodule, k: int) -> None:
    """Shift each latent's bias / threshold to its (1 − k/d_sae) quantile on a data sample."""
    import torch

    with torch.no_grad():
        x, _ = datamodule.sample_rows(4096)
        pre = model.pre_acts(x.to(model.device) * model.input_scale).float()
        if model.sae_lens_architecture == "gated":
            pre = model.gate_pre_acts(pre)
        # each latent's m-th largest value (torch.quantile refuses inputs over 2^24 entries)
        m = max(1, round(len(pre) * k / model.d_sae))
        quantile = pre.topk(m, dim=0).values[-1]
        if hasattr(model, "log_threshold"):  # JumpReLU: θ at the quantile
            model.log_threshold.copy_(quantile.clamp_min(1e-3).log())
        else:  # ReLU-L1 (b_enc) and gated (b_gate = b_enc): π − quantile
            model.b_enc.sub_(quantile)


def worker(args) -> dict:
    """Trains one (architecture, path) and returns its timings and memory as a dict."""
    import lightning as L
    import torch

    from dictlearn import ActivationDataModule, DictionaryTraining
    from dictlearn.callbacks import KeepFreedMemory

    torch.set_num_threads(args.threads)
    L.seed_everything(0)
    timer, probe = _callbacks(args.warmup, args.k, args.trained_sparsity)
    precision = "bf16-mixed" if args.dtype == "bf16" else "32-true"
    trainer = L.Trainer(
        accelerator=args.device, devices=1, max_steps=args.steps + args.warmup + 1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0, precision=precision,
        callbacks=[timer, probe, KeepFreedMemory()],  # as `dictlearn fit` (dictlearn/runtime.py); peers run without
    )
    data = ActivationDataModule(args.path, batch_size=args.batch, val_rows=0)
    training = DictionaryTraining(build(args.worker, args.d_in, args.d_sae, args.k, args.sparse_path, args.initial_l0))
    with PeakMemory(args.device) as memory:
        trainer.fit(training, data)
    return {
        "step": statistics.median(timer.times),
        "mean_step": statistics.fmean(timer.times),  # the whole run's (a dense warm-up included)
        "memory": memory.bytes,
        "l0": probe.l0_sum / max(1, probe.steps),
        "sparse_fraction": probe.sparse_steps / max(1, probe.steps),
    }


def run_worker(args, name: str, sparse_path: str) -> dict:
    command = [
        sys.executable, __file__, "--worker", name, "--sparse-path", sparse_path, "--path", args.path,
        "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
        "--d-in", str(args.d_in), "--d-sae", str(args.d_sae), "--k", str(args.k),
        "--trained-sparsity" if args.trained_sparsity else "--no-trained-sparsity",
        *(["--initial-l0", str(args.initial_l0)] if args.initial_l0 is not None else []),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} ({sparse_path}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------- machine and data
def matmul_peak_gflops(device: str, dtype: str, n: int = 4096, repeats: int = 5, trials: int = 5) -> float:
    """Best of `trials` timings of `repeats` n×n matmuls in `dtype` (the dense peak)."""
    import torch

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    best = float("inf")
    for _ in range(trials + 1):  # the first trial warms up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best / 1e9


def write_data(path: str, rows: int, d_in: int) -> None:
    import numpy as np

    from dictlearn.data import write_datasets

    acts = np.random.default_rng(0).standard_normal((rows, d_in), dtype=np.float32)
    write_datasets(path, {"acts": acts}, {})


def describe_machine(args) -> str:
    import torch

    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}, load {load:.1f}"


# --------------------------------------------------------------------- the CLI check
def check_cli(args) -> None:
    """Throughput of `dictlearn fit --config recipes/topk.yaml` from the wall-time difference of
    two `--trainer.max_steps` runs, next to this benchmark's figure for the same model."""
    short, long = 3, 3 + args.steps
    walls = {}
    with tempfile.TemporaryDirectory() as root:
        for steps in (short, long):
            command = [
                sys.executable, "-c", "import sys; from dictlearn.cli import main; sys.exit(main())",
                "fit", "--config", args.cli_recipe,
                "--data.path", args.path, "--data.input_key", "acts", "--data.batch_size", str(args.batch),
                "--trainer.max_steps", str(steps), "--trainer.default_root_dir", f"{root}/{steps}",
                "--trainer.enable_progress_bar", "false", "--trainer.accelerator", args.device,
                "--model.d_sae", str(args.d_sae),
                "--trainer.precision", "bf16-mixed" if args.dtype == "bf16" else "32-true",
            ]
            if args.cli_recipe in ("topk", "batchtopk"):
                command += ["--model.k", str(args.k)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            walls[steps] = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"dictlearn fit failed:\n{done.stderr[-4000:]}")
    cli_step = (walls[long] - walls[short]) / (long - short)
    bench = run_worker(args, args.cli_recipe, "auto")["step"]
    print(f"dictlearn fit --config recipes/{args.cli_recipe}.yaml: {args.batch / cli_step:,.0f} tokens/s "
          f"({cli_step * 1e3:.0f} ms/step from {long} vs {short} steps: {walls[long]:.1f} s − {walls[short]:.1f} s); "
          f"benchmark {args.batch / bench:,.0f} tokens/s; CLI / benchmark = {bench / cli_step:.2f}")


# --------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: Lightning bf16-mixed autocast (matmuls in bf16, losses and metrics fp32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
    parser.add_argument("--paths", default=",".join(PATHS),
                        help="sparse_path values to run: never, auto, always; none for the peers only")
    parser.add_argument("--peers", default="all",
                        help=f"all (those installed), none, or a comma list of {', '.join(peers.ROWS)}")
    parser.add_argument("--trained-sparsity", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--initial-l0", type=float, default=None,
                        help="threshold mechanisms start at this L0 (--training.initial_l0; with --no-trained-sparsity)")
    parser.add_argument("--smoke", action="store_true", help="2 timed steps, 1 warm-up: checks, not numbers")
    parser.add_argument("--check-cli", action="store_true", help="time `dictlearn fit` with a recipe instead")
    parser.add_argument("--cli-recipe", default="topk")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sparse-path", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup = 2, 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    torch.set_num_threads(args.threads)
    architectures = [a for a in args.architectures.split(",") if a]
    paths = [p for p in args.paths.split(",") if p and p != "none"]
    peer_rows, notes = peers.select(args.peers)
    with tempfile.TemporaryDirectory() as folder:
        args.path = str(Path(folder) / "bench.h5")
        write_data(args.path, args.batch * (args.steps + args.warmup + 3), args.d_in)
        if args.check_cli:
            check_cli(args)
            return
        peaks = {dtype: matmul_peak_gflops(args.device, dtype) for dtype in ("fp32", "bf16")}
        peak = peaks[args.dtype]
        print(f"{describe_machine(args)}; matmul peak fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s")
        print(f"d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, batch {args.batch}, {args.dtype}, "
              f"{args.steps} timed steps after {args.warmup}; trained sparsity {'on' if args.trained_sparsity else 'off'}")
        for note in notes:
            print(note)
        print(f"{'architecture':<13}{'run':<20}{'tokens/s':>9}{'step ms':>9}{'GFLOP/s':>9}{'% peak':>8}"
              f"{'mem MiB':>9}{'L0':>8}{'sparse':>8}{'speedup':>9}")
        summary = []
        for index, name in enumerate(architectures):
            results = run_architecture(args, name, paths, peer_rows, reverse=index % 2 == 1)
            dense = results.get(("dictlearn", paths[0])) if paths else None
            for (kind, run), r in results.items():
                label = run if kind == "dictlearn" else peers.ROWS[run].label
                print(format_row(args, name, label, r, dense if kind == "dictlearn" else None, peak), flush=True)
            summary.append(auto_over_fastest_peer(args, name, results))
        if any(summary):
            print("dictlearn auto / fastest peer (same architecture, this run):")
            print("\n".join(f"  {line}" for line in summary if line))


def run_architecture(args, name: str, paths: list[str], peer_rows: list[str], reverse: bool) -> dict:
    """Every run of one architecture, keyed ("dictlearn", path) or ("peer", row), in table order."""
    runs = [("dictlearn", path) for path in paths]
    runs += [("peer", row) for row in peer_rows if name in peers.ROWS[row].architectures]
    results = {}
    for kind, run in runs[::-1] if reverse else runs:
        results[(kind, run)] = run_worker(args, name, run) if kind == "dictlearn" else peers.run_peer(args, run, name)
    return {key: results[key] for key in runs}


def auto_over_fastest_peer(args, name: str, results: dict) -> str | None:
    """`topk  1.23x  (auto 7,100 vs sparsify 5,800 tokens/s)`; None without an auto run and a timed peer."""
    auto = results.get(("dictlearn", "auto"))
    timed = {run: r for (kind, run), r in results.items() if kind == "peer" and "step" in r}
    if auto is None or not timed:
        return None
    fastest = min(timed, key=lambda run: timed[run]["step"])
    peer = timed[fastest]
    return (f"{name:<11}{peer['step'] / auto['step']:>6.2f}x  (auto {args.batch / auto['step']:,.0f} vs "
            f"{peers.ROWS[fastest].label} {args.batch / peer['step']:,.0f} tokens/s)")


def format_row(args, name: str, label: str, r: dict, dense: dict | None, peak: float) -> str:
    """One table row; a peer's row (no `dense` reference) has no sparse fraction or speedup."""
    if "step" not in r:
        return f"{name:<13}{label:<20}" + (f"skipped: {r['skip']}" if "skip" in r else f"failed: {r['error']}")
    gflops = 12 * args.d_in * args.d_sae * args.batch / r["step"] / 1e9  # dense-equivalent FLOPs
    row = (f"{name:<13}{label:<20}{args.batch / r['step']:>9,.0f}{r['step'] * 1e3:>9.1f}{gflops:>9.0f}"
           f"{100 * gflops / peak:>8.0f}{r['memory'] / 2**20:>9.0f}{r['l0']:>8.1f}")
    if dense is None:
        return row
    return row + f"{r['sparse_fraction']:>8.0%}{dense['step'] / r['step']:>8.2f}x   mean step {r['mean_step'] * 1e3:.1f} ms"


if __name__ == "__main__":
    main()
