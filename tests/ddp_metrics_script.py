"""Two gloo ranks on CPU update the metrics on uneven shards; rank 0 writes the synced results.

Usage: python tests/ddp_metrics_script.py OUTDIR  (run by tests/test_metrics.py::test_ddp_matches_single_process)
Writes OUTDIR/data.pt (the whole dataset, for the test's reference) and OUTDIR/results.json.
"""

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dictlearn.metrics import ReconstructionMetrics, SparsityMetrics  # noqa: E402

D, D_SAE = 6, 10
# Uneven shards, unequal update sizes per rank: rank 0 sees rows [0, 150), rank 1 rows [150, 401).
CHUNKS = {0: [7, 100, 43], 1: [33, 200, 18]}
DEAD_ON_RANK0 = 3  # fires only on one row of rank 1's shard: alive globally
DEAD_EVERYWHERE = 7


def make_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = sum(map(sum, CHUNKS.values()))
    target = torch.randn(n, D, generator=g) + 3.0  # non-zero mean: centring matters for fvu
    reconstruction = 0.9 * target + 0.3 * torch.randn(n, D, generator=g)
    latents = torch.relu(torch.randn(n, D_SAE, generator=g) - 0.5)
    latents[:, DEAD_ON_RANK0] = 0.0
    latents[sum(CHUNKS[0]) + 40, DEAD_ON_RANK0] = 2.5
    latents[:, DEAD_EVERYWHERE] = 0.0
    return {"target": target, "reconstruction": reconstruction, "latents": latents}


def run_rank(rank: int, world_size: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    data = make_data()
    recon, sparsity = ReconstructionMetrics(d=D), SparsityMetrics(D_SAE)
    start = sum(CHUNKS[0]) if rank == 1 else 0
    for size in CHUNKS[rank]:
        rows = slice(start, start + size)
        recon.update(data["target"][rows], data["reconstruction"][rows])
        sparsity.update(data["latents"][rows])
        start += size
    results = {k: v.item() for k, v in {**recon.compute(), **sparsity.compute()}.items()}
    density = sparsity.feature_density()
    counts, edges = sparsity.log10_density_histogram(bins=20)
    with sparsity.sync_context():
        global_tokens = sparsity.n_tokens.item()
    results.update(
        feature_density=density.tolist(),
        histogram_counts=counts.tolist(),
        histogram_edges=edges.tolist(),
        n_tokens_global=global_tokens,
        n_tokens_local=sparsity.n_tokens.item(),
        recon_n_tokens_local=recon.n_tokens.item(),
    )
    if rank == 0:
        torch.save(data, Path(outdir) / "data.pt")
        (Path(outdir) / "results.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()  # without it gloo may abort at interpreter exit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    mp.spawn(run_rank, args=(2, free_port(), sys.argv[1]), nprocs=2, join=True)
