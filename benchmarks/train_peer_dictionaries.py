"""Train one dictionary with each peer library on a harvested file's training rows, and save it
with that library's own save function: the outside dictionaries for `dictlearn evaluate` and
`dictlearn compare --include` (docs/outside.md).

    bash benchmarks/install_peers.sh                       # once: .bench-venv with the peers
    .venv/bin/dictlearn harvest --out acts.h5 --tokens 100000
    .bench-venv/bin/python benchmarks/train_peer_dictionaries.py acts.h5 --key transformer.h.2 --out peers/
    # -> peers/saelens_topk/ (cfg.json + sae_weights.safetensors), peers/sparsify/h.2/ (+ config.json),
    #    peers/dictionary_learning_batchtopk/ (ae.pt + config.json)

Each library trains with its own loss and update: SAELens' `TopKTrainingSAE.training_forward_pass`
(+ Adam), sparsify's `SparseCoder.forward` FVU (+ Adam, its b_dec start, decoder renormalisation
and gradient projection, as its `Trainer` with the default auxk_alpha 0), dictionary_learning's `trainSAE` with its `BatchTopKTrainer`. Rows come
from the file's training part only (the rows before dictlearn's held-out split), in the same
seeded blocks for all three. What each format can record of the site is recorded: SAELens'
metadata (model and hook), sparsify's run config (model; its hookpoint is relative to the model's
`base_model`), dictionary_learning's trainer config (`lm_name`, `submodule_name`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import warnings
from pathlib import Path

import h5py
import torch

from dictlearn.data.split import HeldOutSplit

warnings.filterwarnings("ignore")


def training_rows(path: Path, key: str, n_rows: int, seed: int) -> torch.Tensor:
    """[n, d] float32 training rows (dictlearn's split: never a held-out row), shuffled."""
    with h5py.File(path, "r") as f:
        dataset = f[key]
        split = HeldOutSplit.from_file(str(path), dataset.shape[0])
        rows = torch.cat([torch.from_numpy(dataset[a:b]).float() for a, b in split.sample_slices(n_rows, seed)])
        model = f.attrs.get("model_name") or dataset.attrs.get("model_name")
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))], model


def batches(rows: torch.Tensor, batch_size: int, steps: int):
    for step in range(steps):
        start = (step * batch_size) % (len(rows) - batch_size + 1)
        yield rows[start: start + batch_size]


def train_saelens(rows, args, model_name: str, out: Path) -> Path:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata, TrainStepInput

    cfg = TopKTrainingSAEConfig(d_in=rows.shape[1], d_sae=args.d_sae, k=args.k, dtype="float32", device="cpu",
                                metadata=SAEMetadata(model_name=model_name, hook_name=args.key))
    sae = TopKTrainingSAE(cfg)
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
    for step, x in enumerate(batches(rows, args.batch_size, args.steps)):
        output = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                          n_training_steps=step, is_logging_step=False))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    folder = out / "saelens_topk"
    shutil.rmtree(folder, ignore_errors=True)
    sae.save_inference_model(folder)
    return folder


def train_sparsify(rows, args, model_name: str, out: Path) -> Path:
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(rows.shape[1], SparseCoderConfig(num_latents=args.d_sae, k=args.k))
    with torch.no_grad():  # as sparsify's Trainer at step 0: b_dec = the first batch's mean
        sae.b_dec.copy_(rows[: args.batch_size].mean(0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
    for x in batches(rows, args.batch_size, args.steps):
        output = sae(x)
        optimizer.zero_grad()
        output.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        sae.set_decoder_norm_to_unit_norm()
    run = out / "sparsify"
    shutil.rmtree(run, ignore_errors=True)
    hookpoint = args.key.split(".", 1)[1] if args.key.startswith("transformer.") else args.key  # base_model-relative
    sae.save_to_disk(run / hookpoint)
    (run / "config.json").write_text(json.dumps({"model": model_name, "hookpoints": [hookpoint]}))
    return run


def train_dictionary_learning(rows, args, model_name: str, out: Path) -> Path:
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer
    from dictionary_learning.training import trainSAE

    folder = out / "dictionary_learning_batchtopk"
    shutil.rmtree(folder, ignore_errors=True)
    trainer = {"trainer": BatchTopKTrainer, "dict_class": BatchTopKSAE, "activation_dim": rows.shape[1],
               "dict_size": args.d_sae, "k": args.k, "steps": args.steps, "layer": 0, "lm_name": model_name,
               "submodule_name": args.key, "device": "cpu", "threshold_start_step": min(1000, args.steps // 5),
               "warmup_steps": min(1000, args.steps // 10)}
    trainSAE(batches(rows, args.batch_size, args.steps), [trainer], steps=args.steps, save_dir=str(folder),
             device="cpu")
    trainer_folder = folder / "trainer_0"
    for item in trainer_folder.iterdir():  # trainSAE writes save_dir/trainer_<i>/{ae.pt, config.json}
        item.rename(folder / item.name)
    trainer_folder.rmdir()
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="a harvested HDF5 file (dictlearn harvest)")
    p.add_argument("--key", required=True, help="the dataset (hook) to train on, e.g. transformer.h.2")
    p.add_argument("--out", type=Path, required=True, help="folder for the three dictionaries")
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=None, help="default: 2e-4 / sqrt(d_sae / 2^14) (Gao et al.)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="saelens,sparsify,dictionary_learning")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine: oversubscribed "
                   "threads made a step 15x slower)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.lr = args.lr or 2e-4 / math.sqrt(args.d_sae / 2**14)
    torch.manual_seed(args.seed)
    rows, model_name = training_rows(args.data, args.key, args.steps * args.batch_size, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, train in (("saelens", train_saelens), ("sparsify", train_sparsify),
                        ("dictionary_learning", train_dictionary_learning)):
        if name in args.only.split(","):
            start = time.perf_counter()
            folder = train(rows, args, model_name or "unknown", args.out)
            print(f"{name}: {folder} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
