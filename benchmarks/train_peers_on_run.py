"""Train a TopK SAE with each peer library on a comparison's own activations, saved in its own format.

For `dictlearn compare --include` (docs/compare.md, "Including dictionaries trained elsewhere"):
the folders this writes are what a researcher would bring from SAELens, sparsify and
dictionary_learning, trained on the same model and layer as the run, so the report can put them
beside the run's own architectures.

    bash benchmarks/install_peers.sh                                   # once: .bench-venv with the peers
    .bench-venv/bin/python benchmarks/train_peers_on_run.py RUN --key transformer.h.2 --out PEERS --k 16
    dictlearn compare --out RUN ... --include PEERS/saelens,PEERS/sparsify,PEERS/dictionary_learning

Each dictionary is the library's own class (`sae_lens.TopKSAE`, `sparsify.SparseCoder`,
`dictionary_learning`'s `AutoEncoderTopK`) trained through its own forward, and saved with the
library's own save function (dictionary_learning: `ae.pt` + `config.json`, as its `trainSAE`
writes them). The loop is this script's, the same for all three: Adam, the run's rows before its
held-out documents only (`HeldOutSplit.n_train`), decoder bias started at the rows' mean, the
library's own loss (sparsify: its FVU; the others: the MSE of their forward). It is not each
library's trainer (no AuxK, no dead-latent resampling, no learning-rate schedule): the point is
the format and the library's inference forward, not its training recipe.
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path

import h5py
import torch

warnings.filterwarnings("ignore")


def rows(path: Path, key: str) -> tuple[torch.Tensor, dict]:
    """The training rows of dataset `key` (those before the held-out documents) and its attributes."""
    from dictlearn.data.split import HeldOutSplit

    with h5py.File(path, "r") as f:
        dataset = f[key]
        split = HeldOutSplit.from_file(str(path), dataset.shape[0])
        attrs = {**{k: f.attrs[k] for k in f.attrs}, **{k: dataset.attrs[k] for k in dataset.attrs}}
        x = torch.from_numpy(dataset[: split.n_train]).float()
    return x, {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}


def fit(module: torch.nn.Module, loss, x: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> float:
    """Adam on `loss(module, batch)` over random batches of `x`; -> the last 10 steps' mean loss."""
    g = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    last = []
    for _ in range(steps):
        value = loss(module, x[torch.randint(len(x), (batch,), generator=g)])
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
        last = (last + [float(value)])[-10:]
    return sum(last) / len(last)


def saelens(x, attrs, args, folder: Path) -> float:
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(model_name=str(attrs.get("model_name")), hook_name=str(attrs.get("hook_name")))
    sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=x.shape[1], d_sae=args.d_sae, k=args.k, metadata=metadata))
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    final = fit(sae, lambda m, b: (m(b) - b).square().sum(-1).mean(), x, args.steps, args.batch, args.lr, 1)
    sae.save_model(folder)
    return final


def sparsify(x, attrs, args, folder: Path) -> float:
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=args.d_sae, k=args.k))
    with torch.no_grad():
        coder.b_dec.copy_(x.mean(0))
    final = fit(coder, lambda m, b: m(b).fvu, x, args.steps, args.batch, args.lr, 2)
    coder.save_to_disk(folder)
    return final


def dictionary_learning(x, attrs, args, folder: Path) -> float:
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    ae = AutoEncoderTopK(x.shape[1], args.d_sae, args.k)
    with torch.no_grad():
        ae.b_dec.copy_(x.mean(0))
    final = fit(ae, lambda m, b: (m(b) - b).square().sum(-1).mean(), x, args.steps, args.batch, args.lr, 3)
    folder.mkdir(parents=True)
    torch.save(ae.state_dict(), folder / "ae.pt")
    trainer = {"trainer_class": "TopKTrainer", "dict_class": "AutoEncoderTopK", "activation_dim": x.shape[1],
               "dict_size": args.d_sae, "k": args.k, "lm_name": str(attrs.get("model_name")),
               "submodule_name": str(attrs.get("hook_name"))}
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"d_submodule": x.shape[1]}}, indent=4))
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a dictlearn compare folder (its activations.h5), or an HDF5 file")
    parser.add_argument("--key", required=True, help="the dataset the run's SAEs read (e.g. transformer.h.2)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--d-sae", type=int, default=256)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    path = args.run / "activations.h5" if args.run.is_dir() else args.run
    x, attrs = rows(path, args.key)
    for name, train in (("saelens", saelens), ("sparsify", sparsify), ("dictionary_learning", dictionary_learning)):
        folder = args.out / name
        if folder.exists():
            shutil.rmtree(folder)
        final = train(x, attrs, args, folder)
        print(f"{name}: {folder} (d_sae {args.d_sae}, k {args.k}, {args.steps} steps of {args.batch}; final loss {final:.4g})")


if __name__ == "__main__":
    main()
