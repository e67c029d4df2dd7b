"""Fingerprint of a short default compare sweep, to prove a speed change leaves training bit-identical.

`save` trains one seed's 21-member sweep (`compare_budget.py`'s build, so compare's plan, optimiser,
calibration and logging) for `--steps` steps on a fixed synthetic file and saves every parameter,
buffer, metric state and Adam state, and the logged CSV. `--auxk` marks every third latent dead at
every step so that AuxK runs (a short run has no dead latents); `--sparse-path` forces a path.
`compare` says which tensors differ between two saves, bit for bit (compared as integers, so
signed zeros count), and whether the logs are equal. Run `save` from the old and the new commit
(a worktree of each on PYTHONPATH) with the same arguments:

    PYTHONPATH=/tmp/old python benchmarks/sweep_fingerprint.py save old.pt --steps 30 --auxk
    python benchmarks/sweep_fingerprint.py save new.pt --steps 30 --auxk
    python benchmarks/sweep_fingerprint.py compare old.pt new.pt
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import compare_budget  # noqa: E402

from dictlearn.data.synth import write_synth_file  # noqa: E402
from dictlearn.training import members  # noqa: E402


def save(out: Path, steps: int, auxk: bool, sparse_path: str | None) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="dictlearn_fingerprint_"))
    write_synth_file(work / "acts.h5", n_rows=1024 * (steps + 20), d=128, n_features=1024, mean_active=8, d_out=128)
    if auxk:  # every third latent dead at every step
        members.LatentActivity.dead = lambda self, window: torch.arange(len(self.tokens_since_fired)) % 3 == 0
    args = argparse.Namespace(architectures=None, sparse_path=sparse_path, warmup=0, steps=steps, profile=False)
    config, group, module, clock = compare_budget.fit(args, work / "acts.h5", work, False)
    logs = {str(f.relative_to(work)): f.read_text() for f in work.rglob("metrics.csv")}
    optimiser = module.trainer.optimizers[0].state_dict()["state"]
    torch.save({"state": module.state_dict(), "optimiser": optimiser, "logs": logs}, out)
    print(f"saved {len(module.state_dict())} tensors of {len(group)} members to {out}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    views = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return t.view(views[t.dtype]) if t.dtype in views else t


def compare(a_path: Path, b_path: Path) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    state = [k for k in a["state"] if k not in b["state"] or not torch.equal(_bits(a["state"][k]), _bits(b["state"][k]))]
    adam = [(p, n) for p in a["optimiser"] for n in a["optimiser"][p]
            if not torch.equal(_bits(a["optimiser"][p][n]), _bits(b["optimiser"][p][n]))]
    logs = a["logs"] == b["logs"]
    print(f"tensors differing: {len(state)} of {len(a['state'])} {state[:8]}")
    print(f"Adam states differing: {len(adam)}; logs equal: {logs}")
    return 0 if not state and not adam and logs else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save")
    s.add_argument("out", type=Path)
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--auxk", action="store_true", help="mark every third latent dead so that AuxK runs")
    s.add_argument("--sparse-path", choices=("auto", "always", "never"), default=None)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.command == "save":
        save(args.out, args.steps, args.auxk, args.sparse_path)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    raise SystemExit(main())
