"""Where one TopK training step goes: d_in 512 x d_sae 4096, k 32, batch 4096 (throughput.py's workload).

Trains a `TopKSAE` through `Trainer.fit` as `dictlearn fit` does (metrics, logging, gradient
clipping 1.0), then records `--steps` steps with torch.profiler. The step's pieces are labelled
with `torch.profiler.record_function` around the library's own functions (nothing in the library
changes), and each label's exclusive CPU time is its share:

* encoder forward: the dense [batch, d_in] @ [d_in, d_sae] GEMM (`pre_acts`, no gradient);
* top-k selection: `select` over the d_sae pre-activations (the k largest per token);
* encoder sparse values and backward: the pre-activations at the selected entries with their
  sparse backward (`sparse_affine`, `_SparseAffine`);
* decoder forward and backward (`sparse_decode`, `_SparseDecode`);
* AuxK: the dead latents' top-k_aux and their decode, forward only (its backward runs through the
  same autograd nodes as the main decoder's and is counted there; AuxK's whole cost is the
  difference in CPU time per step between `--dead-fraction 0.1` and `--dead-fraction 0`);
* loss: the normalised MSE and its backward;
* optimiser: fused Adam's step (`Optimizer.step`, less the forward and backward Lightning's
  closure runs inside it), clipping and the unit-norm constraint;
* forward, the rest: `training_step` less the labelled pieces (decode's bias, Python);
* backward, the rest: `backward` less the labelled autograd nodes (the engine between them);
* bookkeeping: metrics, fire counts, dead counters, logging (`_log_train`, `_update_fired`);
* the rest: Lightning's loop, the batch, autograd's engine outside the labelled nodes.

    python benchmarks/topk_breakdown.py                     # ~1 min on 2 cores
    python benchmarks/topk_breakdown.py --dead-fraction 0   # without dead latents (no AuxK term)

`--dead-fraction` (default 0.1) marks that share of latents dead in every step, so the AuxK term
runs as it does once a run has dead latents (a fresh dictionary has none for a dead window).
Shares are of the profiled steps' wall time (the profiler's ranges are wall-clock intervals); on a loaded machine report them as
ratios, labelled "under load", never as absolute timings.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import torch
from torch.profiler import record_function

import dictlearn.dictionaries.latents as latents_module
from dictlearn import ActivationDataModule, DictionaryTraining, TopKSAE
from dictlearn.training import Member, TrainingConfig
from dictlearn.training import module as module_module

LABELS = {  # record_function label -> category of the report
    "bd::encoder_forward": "encoder GEMM (forward, dense)",
    "bd::topk": "top-k selection",
    "bd::encoder_sparse": "encoder at the selected entries (+ backward)",
    "bd::decoder": "decoder (+ backward)",
    "bd::auxk": "AuxK (forward; its backward falls under the decoder and encoder entries)",
    "bd::loss": "loss (+ backward)",
    "bd::bookkeeping": "bookkeeping: metrics, fire counts, dead counters, logging",
    "bd::clip_constrain": "optimiser: clipping, unit-norm constraint",
    "bd::forward_rest": "forward, the rest (decode's bias, the step's Python)",
    "bd::backward_rest": "backward, autograd's engine between the nodes",
    "Optimizer.step#Adam.step": "optimiser: fused Adam step (with Lightning's closure around it)",
}
BACKWARD = {  # autograd node (in `autograd::engine::evaluate_function: <node>`) -> label
    "_SparseAffineBackward": "bd::encoder_sparse", "_SparseDecodeBackward": "bd::decoder",
}


def labelled(label: str, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return function(*args, **kwargs)
    return wrapper


def instrument(dead_fraction: float) -> None:
    """Label the step's pieces (monkeypatching, this process only)."""
    TopKSAE.pre_acts = labelled("bd::encoder_forward", TopKSAE.pre_acts)
    TopKSAE.select = labelled("bd::topk", TopKSAE.select)
    TopKSAE.sparsity_losses = labelled("bd::auxk", TopKSAE.sparsity_losses)
    TopKSAE.reconstruction_loss = labelled("bd::loss", TopKSAE.reconstruction_loss)
    latents_module.sparse_affine = labelled("bd::encoder_sparse", latents_module.sparse_affine)
    latents_module.sparse_decode = labelled("bd::decoder", latents_module.sparse_decode)
    training = module_module.DictionaryTraining
    for name in ("_log_train", "_update_fired"):
        setattr(training, name, labelled("bd::bookkeeping", getattr(training, name)))
    for name in ("on_before_optimizer_step", "configure_gradient_clipping"):
        setattr(training, name, labelled("bd::clip_constrain", getattr(training, name)))
    TopKSAE.constrain_parameters = labelled("bd::clip_constrain", TopKSAE.constrain_parameters)
    # Lightning runs forward and backward in a closure inside Optimizer.step: without these two
    # labels their unlabelled parts counted as Adam's (2026-12-07: "Adam" 4.5 % of the step where
    # the fused kernel alone takes ~1 %)
    training.training_step = labelled("bd::forward_rest", training.training_step)
    training.backward = labelled("bd::backward_rest", training.backward)
    if dead_fraction > 0:
        def dead(self, window: int) -> torch.Tensor:
            mask = torch.zeros_like(self.tokens_since_fired, dtype=torch.bool)
            mask[: int(dead_fraction * len(mask))] = True
            return mask
        module_module.LatentActivity.dead = dead


class Profiled(L.Callback):
    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.profiler, self.cpu_seconds, self.wall_seconds = None, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()
            self.cpu_started, self.wall_started = time.process_time(), time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup + self.steps:
            self.cpu_seconds = time.process_time() - self.cpu_started
            self.wall_seconds = time.perf_counter() - self.wall_started
            self.profiler.__exit__(None, None, None)
            trainer.should_stop = True


def exclusive_times(events) -> dict[str, float]:
    """Exclusive CPU µs per label: a labelled range's time less the labelled ranges inside it."""
    def label_of(event) -> str | None:
        if event.name in LABELS:
            return event.name
        if event.name.startswith("autograd::engine::evaluate_function: "):
            node = event.name.rsplit(": ", 1)[1]
            for key, label in BACKWARD.items():
                if node.startswith(key):
                    return label
            return "backward:" + node
        return None

    def inside_auxk(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name == "bd::auxk":
                return True
            parent = parent.cpu_parent
        return False

    totals: dict[str, float] = defaultdict(float)
    for event in events:
        label = label_of(event)
        if label is None or inside_auxk(event):  # AuxK's own top-k and decode are AuxK's
            continue
        inner, stack = 0.0, list(event.cpu_children) if label != "bd::auxk" else []
        while stack:  # the nearest labelled descendants
            child = stack.pop()
            if label_of(child) is not None:
                inner += child.time_range.elapsed_us()
            else:
                stack.extend(child.cpu_children)
        totals[label] += event.time_range.elapsed_us() - inner
    return totals


def write_data(path: Path, rows: int, d_in: int) -> None:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.create_dataset("acts", data=rng.standard_normal((rows, d_in), dtype=np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dead-fraction", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    instrument(args.dead_fraction)
    work = Path(tempfile.mkdtemp(prefix="dictlearn_topk_breakdown_"))
    write_data(work / "acts.h5", args.batch * (args.warmup + args.steps + 4), args.d_in)
    L.seed_everything(0)
    clock = Profiled(args.warmup, args.steps)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.warmup + args.steps + 1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        gradient_clip_val=1.0, callbacks=[clock], default_root_dir=str(work),
    )  # fmt: skip
    member = Member(TopKSAE(d_in=args.d_in, d_sae=args.d_sae, k=args.k), training=TrainingConfig())
    trainer.fit(DictionaryTraining(member), ActivationDataModule(str(work / "acts.h5"), batch_size=args.batch, val_rows=0))

    totals = exclusive_times(clock.profiler.profiler.function_events)
    merged: dict[str, float] = defaultdict(float)
    for label, us in totals.items():
        merged[LABELS.get(label, "other backward nodes" if label.startswith("backward:") else label)] += us
    # the profiler's ranges are wall-clock intervals: shares of the profiled steps' wall time (on a
    # loaded machine the time a process waits for a core falls on every piece alike)
    step_us = 1e6 * clock.wall_seconds / args.steps
    named = sum(merged.values()) / args.steps
    flops = 2 * args.batch * args.d_in * args.d_sae  # the encoder's dense forward GEMM, per step
    print(f"TopK d_in {args.d_in} x d_sae {args.d_sae}, k {args.k}, batch {args.batch}, {args.threads} thread(s), "
          f"{args.steps} profiled steps, dead fraction {args.dead_fraction}; torch {torch.__version__}; "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"wall {step_us / 1e3:.1f} ms per step (process CPU time {1e3 * clock.cpu_seconds / args.steps:.1f} ms; "
          "the profiler adds a little); shares of the wall time:")
    for name, us in sorted(merged.items(), key=lambda item: -item[1]):
        print(f"  {100 * us / args.steps / step_us:5.1f} %  {name}")
    print(f"  {100 * (1 - named / step_us):5.1f} %  the rest: Lightning's loop, the batch, autograd's engine")
    encoder = merged[LABELS["bd::encoder_forward"]] / args.steps
    print(f"the step runs at {100 * encoder / step_us:.0f} % of its physical limit (the dense encoder forward, "
          f"{flops / args.batch / 1e6:.1f} MFLOP per token, alone; the issue's target is 75 %)")


if __name__ == "__main__":
    main()
