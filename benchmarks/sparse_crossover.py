"""Sparse against dense training path, per mechanism and active fraction: where the crossover lies.

Times one training step's forward and backward (`Dictionary.training_losses`, then `backward`;
no optimiser, no Lightning) on the dense path (`sparse_path="never"`) and the sparse one
(`"always"`), for TopK and BatchTopK at k = L0 and for ReLU-L1, JumpReLU and gated started at
that L0 (`start_at_l0`). Thread CPU time, best of 3 rounds, so that other load on a shared box
weighs less; the ratio sparse / dense is what `sparse_cutoff` and `sparse_min_latents`
(dictlearn/dictionaries/model.py) are set from (docs/performance.md, "The selection rule").

    python benchmarks/sparse_crossover.py                          # d_in 128, d_sae 512, batch 1024: ~1 min
    python benchmarks/sparse_crossover.py --d-in 512 --d-sae 4096 --batch 4096 --l0 204 307 409 --reps 2
"""

from __future__ import annotations

import argparse
import time

import torch

from dictlearn.dictionaries.batchtopk import BatchTopKSAE
from dictlearn.dictionaries.gated import GatedSAE
from dictlearn.dictionaries.jumprelu import JumpReLUSAE
from dictlearn.dictionaries.latents import TrainingStep
from dictlearn.dictionaries.relu_l1 import ReLUL1SAE
from dictlearn.dictionaries.topk import TopKSAE


def step_ms(model, x, path: str, reps: int) -> float:
    """Best thread CPU ms of one forward + backward on `path`, over 3 rounds of `reps`."""
    step = TrainingStep(0, 1.0, None, path)

    def one() -> None:
        result = model.training_losses(x, x, step)
        sum(result.losses.values()).backward()
        model.zero_grad(set_to_none=True)

    one()
    best = float("inf")
    for _ in range(3):
        started = time.thread_time()
        for _ in range(reps):
            one()
        best = min(best, (time.thread_time() - started) / reps)
    return 1e3 * best


def models(args, x, l0: int) -> dict:
    shape = dict(d_in=args.d_in, d_sae=args.d_sae)
    built = {"topk": TopKSAE(k=l0, **shape), "batchtopk": BatchTopKSAE(k=l0, **shape)}
    for name, cls in (("relu_l1", ReLUL1SAE), ("jumprelu", JumpReLUSAE), ("gated", GatedSAE)):
        built[name] = cls(**shape)
        built[name].start_at_l0(x, l0)
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--l0", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10, help="steps per round (default 10)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)
    print(f"d_in {args.d_in}, d_sae {args.d_sae}, batch {args.batch}, {args.threads} thread(s), torch {torch.__version__}")
    for l0 in args.l0:
        for name, model in models(args, x, l0).items():
            dense, sparse = step_ms(model, x, "never", args.reps), step_ms(model, x, "always", args.reps)
            print(f"L0 {l0:4d} ({100 * l0 / args.d_sae:4.1f} %) {name:10s} dense {dense:8.2f} ms  sparse {sparse:8.2f} ms"
                  f"  sparse/dense {sparse / dense:.2f}", flush=True)


if __name__ == "__main__":
    main()
