"""Training throughput of every dictlearn architecture on the standard workload.

Standard workload (issue 5): d_in 512, d_sae 4096, k 32, batch 4096 tokens, fp32. Each
architecture trains through the real path a user gets (`Trainer.fit` with the HDF5 data module,
metrics and logging on): 3 warm-up steps, then the median of 20 timed steps.

    python benchmarks/throughput.py [--threads 2] [--steps 20] [--device cpu|cuda]

Prints tokens/s, the median step time, the achieved GFLOP/s of the dense-equivalent step
(12·d_in·d_sae FLOPs per token) and the measured dense fp32 matmul peak. Peers (SAELens, sparsify,
dictionary_learning) are not run yet: that is the performance issue's job.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from dictlearn import ActivationDataModule, BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUL1SAE, TopKSAE
from dictlearn.data import write_datasets

D_IN, D_SAE, K, BATCH = 512, 4096, 32, 4096
ARCHITECTURES = {
    "relu_l1": lambda: ReLUL1SAE(d_in=D_IN, d_sae=D_SAE),
    "topk": lambda: TopKSAE(d_in=D_IN, d_sae=D_SAE, k=K),
    "batchtopk": lambda: BatchTopKSAE(d_in=D_IN, d_sae=D_SAE, k=K),
    "gated": lambda: GatedSAE(d_in=D_IN, d_sae=D_SAE),
    "jumprelu": lambda: JumpReLUSAE(d_in=D_IN, d_sae=D_SAE),
}


class StepTimer(L.Callback):
    """Wall time of each training step (batch fetch included), after `warmup` steps."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self._start = warmup, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)

    @staticmethod
    def _sync(pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()


def matmul_peak_gflops(device: str, n: int = 4096, repeats: int = 5, trials: int = 5) -> float:
    """Best of `trials` timings of `repeats` fp32 n×n matmuls (the machine's dense peak)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
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


def measure(name: str, path: str, steps: int, device: str) -> float:
    L.seed_everything(0)
    timer = StepTimer(warmup=3)
    trainer = L.Trainer(
        accelerator=device, devices=1, max_steps=steps + 3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, gradient_clip_val=1.0, callbacks=[timer],
    )
    data = ActivationDataModule(path, batch_size=BATCH, val_rows=0)
    trainer.fit(ARCHITECTURES[name](), data)
    return statistics.median(timer.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops(args.device)
    flops_per_token = 12 * D_IN * D_SAE
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "bench.h5")
        rows = BATCH * (args.steps + 4)
        acts = np.random.default_rng(0).standard_normal((rows, D_IN), dtype=np.float32)
        write_datasets(path, {"acts": acts}, {})
        print(f"device {args.device}, {args.threads} threads, matmul peak {peak:.0f} GFLOP/s")
        print(f"{'architecture':<14}{'tokens/s':>10}{'step ms':>10}{'GFLOP/s':>10}{'% peak':>8}")
        for name in ARCHITECTURES:
            step = measure(name, path, args.steps, args.device)
            gflops = flops_per_token * BATCH / step / 1e9
            print(f"{name:<14}{BATCH / step:>10.0f}{step * 1e3:>10.1f}{gflops:>10.0f}{100 * gflops / peak:>8.0f}")


if __name__ == "__main__":
    main()
