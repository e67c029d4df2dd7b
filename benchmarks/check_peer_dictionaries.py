"""FVU and L0 of the dictionaries `train_peer_dictionaries.py` wrote, computed by each library's own
loader and encode/decode on dictlearn's held-out rows of the file: the numbers `dictlearn
evaluate` must reproduce for the same folders (docs/outside.md, "Trained on the embedded model").

    .bench-venv/bin/python benchmarks/check_peer_dictionaries.py acts.h5 --key transformer.h.2 --peers peers/
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import h5py
import torch

from dictlearn.data.split import HeldOutSplit

warnings.filterwarnings("ignore")


def heldout_rows(path: Path, key: str) -> torch.Tensor:
    """[n, d] float64: the rows `dictlearn evaluate` measures (its default held-out split)."""
    with h5py.File(path, "r") as f:
        first, last = HeldOutSplit.from_file(str(path), f[key].shape[0]).heldout
        return torch.from_numpy(f[key][first:last]).double()


def report(name: str, x: torch.Tensor, encode, decode) -> None:
    """FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² and mean L0, in float64 from the library's float32 outputs."""
    with torch.no_grad():
        z = encode(x.float()).double()
        x_hat = decode(z.float()).double()
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    print(f"{name}: fvu {fvu:.6f}  l0 {float((z != 0).sum(-1).double().mean()):.4f}  rows {len(x)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--key", required=True)
    p.add_argument("--peers", type=Path, required=True, help="the --out folder of train_peer_dictionaries.py")
    args = p.parse_args()
    torch.set_num_threads(1)
    x = heldout_rows(args.data, args.key)

    from sae_lens import SAE

    sae = SAE.load_from_disk(args.peers / "saelens_topk")
    report("saelens", x, sae.encode, sae.decode)

    from sparsify import SparseCoder

    (coder_folder,) = [p for p in (args.peers / "sparsify").iterdir() if p.is_dir()]
    coder = SparseCoder.load_from_disk(coder_folder)

    def sparsify_encode(v: torch.Tensor) -> torch.Tensor:
        out = coder.encode(v)
        return torch.zeros(len(v), coder.num_latents).scatter_(-1, out.top_indices, out.top_acts)

    report("sparsify", x, sparsify_encode, lambda z: z @ coder.W_dec + coder.b_dec)

    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE

    ae = BatchTopKSAE.from_pretrained(str(args.peers / "dictionary_learning_batchtopk" / "ae.pt"))
    report("dictionary_learning", x, ae.encode, ae.decode)


if __name__ == "__main__":
    main()
