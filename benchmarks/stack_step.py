"""Stacked members against one by one: CPU time of one training step's forward and backward.

Three members per mechanism of compare's shape (d_in 128, d_sae 512, batch 1024, k or L0 8/16/32),
each group's step once member by member (`Dictionary.training_losses`) and once stacked
(`dictlearn.training.stack.stacked_training_losses`), alternated, `--rounds` rounds of `--repeats`
steps; prints the median of each and their ratio. Process CPU time on `--threads` threads (default
1): on a loaded machine it moves less with other jobs than wall time does; report it as under load.

    python benchmarks/stack_step.py [--threads 1] [--rounds 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from dictlearn import BatchTopKSAE, JumpReLUSAE, ReLUL1SAE, TopKSAE
from dictlearn.dictionaries.latents import TrainingStep
from dictlearn.training.stack import stacked_training_losses

D, N, B, L0 = 128, 512, 1024, (8, 16, 32)
TC = dict(d_out=D, transcoder=True)
GROUPS = {
    "topk": lambda: [TopKSAE(k=k, d_in=D, d_sae=N) for k in L0],
    "batchtopk": lambda: [BatchTopKSAE(k=k, d_in=D, d_sae=N) for k in L0],
    "relu_l1": lambda: [ReLUL1SAE(d_in=D, d_sae=N) for _ in L0],
    "jumprelu": lambda: [JumpReLUSAE(d_in=D, d_sae=N) for _ in L0],
    "topk_transcoder": lambda: [TopKSAE(k=k, d_in=D, d_sae=N, **TC) for k in L0],
    "topk_skip_transcoder": lambda: [TopKSAE(k=k, d_in=D, d_sae=N, skip_connection=True, **TC) for k in L0],
}


def step(members, x: torch.Tensor, y: torch.Tensor, stacked: bool) -> None:
    """One forward and backward of every member; 20 dead latents each (AuxK runs)."""
    ys = [y if m.transcoder else x for m in members]
    steps = [TrainingStep(step=5, dead=torch.arange(N) < 20, sparse_path="never")] * len(members)
    for member in members:
        member.zero_grad(set_to_none=True)
    if stacked:
        results = stacked_training_losses(members, [x] * len(members), ys, steps)
    else:
        results = [m.training_losses(x, t, s) for m, t, s in zip(members, ys, steps)]
    sum(sum(r.losses.values()) for r in results).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    x, y = torch.randn(B, D), torch.randn(B, D)
    groups = {name: make() for name, make in GROUPS.items()}
    seconds: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.rounds):
        for name, members in groups.items():
            for stacked in (False, True):
                step(members, x, y, stacked)
                start = time.process_time()
                for _ in range(args.repeats):
                    step(members, x, y, stacked)
                seconds.setdefault((name, stacked), []).append((time.process_time() - start) / args.repeats)
    print(f"{args.threads} thread(s), torch {torch.__version__}, load {os.getloadavg()[0]:.1f}; process CPU ms per step")
    for name in groups:
        alone, stacked = (sorted(seconds[(name, s)])[len(seconds[(name, s)]) // 2] for s in (False, True))
        print(f"{name:22s} one by one {1e3 * alone:7.1f}  stacked {1e3 * stacked:7.1f}  stacked/one by one "
              f"{stacked / alone:.2f}")


if __name__ == "__main__":
    main()
