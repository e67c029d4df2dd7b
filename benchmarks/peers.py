"""The peers' training steps (SAELens, sparsify, dictionary_learning), timed as throughput.py times dictlearn.

Each (peer, architecture) builds the peer's own SAE and optimiser at the workload's sizes and runs
one training step as that peer's trainer runs it: forward, the peer's loss with its auxiliary and
sparsity terms, backward, its gradient projection / clipping, optimiser step, decoder
renormalisation and dead-latent bookkeeping.

- SAELens 6.x: `SAETrainer.step`, the trainer's own one-step seam (batch to device,
  `training_forward_pass`, firing statistics, backward, grad-norm clip 1.0, Adam, schedulers),
  after the `maybe_reset_sparsity` call of its `fit` loop. Defaults: Adam lr 3e-4, coefficients 1.
  Rows `SAELens` and, for TopK, `SAELens sparse` (`use_sparse_activations=True`; with
  `rescale_acts_by_decoder_norm=False`, since its default fails in backward with sparse activations).
- sparsify 1.3 (TopK only): the body of `Trainer.fit` for its default `fvu` loss without the
  language-model hook: decoder renormalisation, `SparseCoder` forward, backward,
  `remove_gradient_parallel_to_decoder_directions`, its default optimiser (signum: SignSGD under
  ScheduleFreeWrapper, lr 5e-3/sqrt(d_sae/2^14)), fired-latent bookkeeping. Its default
  auxk_alpha is 0, so no AuxK term. On CUDA its forward autocasts to bf16 whatever `--dtype` says.
- dictionary_learning 0.1: the trainer's own `update(step, x)` (StandardTrainer, TopKTrainer,
  BatchTopKTrainer, GatedSAETrainer, JumpReluTrainer), under the autocast `trainSAE` applies.

Settings are each peer's defaults except that learning-rate and sparsity-penalty warm-ups are off:
they scale a number, cost the same, and would leave a short run (and the training check) at lr 0.
Dead-latent terms run as the trainers run them; every library's window (1000 steps or 10M tokens,
dictlearn's too) is longer than a benchmark run, so they cost only their check. Step 0 (sparsify's
and dictionary_learning's decoder-bias initialisation) is a warm-up step.

Batches are slices of a preloaded float32 tensor of standard-normal rows, moved to the device
inside the timed step; dictlearn reads its batches from HDF5 through its datamodule, which is at
worst a disadvantage to dictlearn.

    python benchmarks/peers.py --row sparsify --architecture topk     # one run; prints JSON
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Callable, NamedTuple

from measure import PeakMemory

ARCHITECTURES = ("relu_l1", "topk", "batchtopk", "gated", "jumprelu")


class Row(NamedTuple):
    library: str  # a `--peers` name for all of a library's rows
    module: str  # what must be importable
    label: str
    architectures: tuple[str, ...]
    install: str


EXTRA, SCRIPT = "pip install -e '.[bench]'", "bash benchmarks/install_peers.sh"
ROWS = {
    "saelens": Row("saelens", "sae_lens", "SAELens", ARCHITECTURES, EXTRA),
    "saelens_sparse": Row("saelens", "sae_lens", "SAELens sparse", ("topk",), EXTRA),
    "sparsify": Row("sparsify", "sparsify", "sparsify", ("topk",), EXTRA),
    "dictionary_learning": Row("dictionary_learning", "dictionary_learning", "dictionary_learning", ARCHITECTURES,
                               SCRIPT),
}


class Unsupported(Exception):
    """The peer has no way to run this device / dtype; its row is skipped with the reason."""


class Peer(NamedTuple):
    step: Callable  # one training step on a CPU batch [batch, d_in]
    l0: Callable  # mean L0 of the peer's training encoding (on a batch where it needs one)
    objects: dict  # the peer's own SAE / trainer / optimiser, for checks


# --------------------------------------------------------------------- selection (parent process)
def select(names: str) -> tuple[list[str], list[str]]:
    """Rows to run for `--peers` (all, none, or a comma list of rows or libraries: `saelens` is both
    SAELens rows) and a note for each library skipped because it is not installed."""
    if names == "none":
        return [], []
    wanted = set(ROWS) if names == "all" else {n for n in names.split(",") if n}
    unknown = wanted - set(ROWS) - {row.library for row in ROWS.values()}
    if unknown:
        raise SystemExit(f"--peers: unknown {', '.join(sorted(unknown))}; choose from all, none, {', '.join(ROWS)}")
    available, notes = [], {}
    for name, row in ROWS.items():
        if name not in wanted and row.library not in wanted:
            continue
        if importlib.util.find_spec(row.module) is None:
            notes[row.library] = f"peer {row.library} not installed, skipped ({row.install})"
        else:
            available.append(name)
    return available, list(notes.values())


def run_peer(args, row: str, architecture: str) -> dict:
    """One (peer, architecture) in its own subprocess: {step, memory, l0}, {skip} or {error}."""
    command = [
        sys.executable, __file__, "--row", row, "--architecture", architecture, "--device", args.device,
        "--dtype", args.dtype, "--threads", str(args.threads), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--batch", str(args.batch), "--d-in", str(args.d_in),
        "--d-sae", str(args.d_sae), "--k", str(args.k),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        return {"error": lines[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------- the peers' steps
def saelens(architecture: str, d_in: int, d_sae: int, k: int, batch: int, device: str, dtype: str,
            sparse: bool = False) -> Peer:
    import sae_lens.saes as saes
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    model, config, extra = {
        "relu_l1": (saes.StandardTrainingSAE, saes.StandardTrainingSAEConfig, {}),
        # With sparse activations its default rescale_acts_by_decoder_norm=True fails in backward
        # (torch 2.13: aten::view on a sparse COO tensor), so that row runs with it off.
        "topk": (saes.TopKTrainingSAE, saes.TopKTrainingSAEConfig,
                 {"k": k, "use_sparse_activations": sparse, "rescale_acts_by_decoder_norm": not sparse}),
        "batchtopk": (saes.BatchTopKTrainingSAE, saes.BatchTopKTrainingSAEConfig, {"k": k}),
        "gated": (saes.GatedTrainingSAE, saes.GatedTrainingSAEConfig, {}),
        "jumprelu": (saes.JumpReLUTrainingSAE, saes.JumpReLUTrainingSAEConfig, {}),
    }[architecture]
    sae = model(config(d_in=d_in, d_sae=d_sae, device=device, **extra))
    trainer = SAETrainer(
        SAETrainerConfig(total_training_samples=batch * 10**6, train_batch_size_samples=batch, lr=3e-4,
                         lr_end=3e-5, device=device, autocast=dtype == "bf16"),  # the runner config's defaults
        sae, data_provider=iter(()),
    )

    def step(x):
        trainer.maybe_reset_sparsity()  # SAETrainer.fit's loop: step, then count it
        output = trainer.step(x)
        trainer.n_training_steps += 1
        return output.loss.detach()

    return Peer(step, lambda x: float(trainer.feature_sparsity.sum()), {"sae": sae, "trainer": trainer})


def sparsify(architecture: str, d_in: int, d_sae: int, k: int, batch: int, device: str, dtype: str) -> Peer:
    import torch

    if dtype == "bf16" and device == "cpu":
        raise Unsupported("sparsify has no dtype option (its forward autocasts to bf16 on CUDA only)")
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device, dtype=torch.float32)
    # TrainConfig defaults: optimizer "signum" at 5e-3/sqrt(num_latents/2^14), auxk_alpha 0
    auxk_alpha = 0.0
    optimizer = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / (d_sae / 2**14) ** 0.5)]),
                                    momentum=0.95)
    optimizer.train()
    tokens_since_fired = torch.zeros(d_sae, device=device, dtype=torch.long)
    did_fire = torch.zeros(d_sae, device=device, dtype=torch.bool)
    torch.set_float32_matmul_precision("high")  # Trainer.fit sets it
    steps = itertools.count()

    def step(x):
        x = x.to(device)
        if next(steps) == 0:  # the hook's first call: b_dec at the batch mean
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        fvu = float(out.fvu.detach())  # the trainer's running average reads it every step
        (out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            tokens_since_fired.add_(len(x))
            tokens_since_fired[did_fire] = 0
            did_fire.zero_()
        return fvu

    return Peer(step, lambda x: float(k), {"sae": sae, "optimizer": optimizer})


def dictionary_learning(architecture: str, d_in: int, d_sae: int, k: int, batch: int, device: str,
                        dtype: str) -> Peer:
    import torch

    if dtype == "bf16" and device == "cpu":
        raise Unsupported("dictionary_learning's trainSAE autocasts on CUDA only")
    from dictionary_learning import trainers

    common = dict(steps=10**6, activation_dim=d_in, dict_size=d_sae, layer=0, lm_name="benchmark",
                  device=device, warmup_steps=0)
    no_sparsity_warmup = dict(sparsity_warmup_steps=None)
    trainer = {
        "relu_l1": lambda: trainers.StandardTrainer(**common, **no_sparsity_warmup, seed=0),
        "topk": lambda: trainers.TopKTrainer(**common, k=k, seed=0),
        "batchtopk": lambda: trainers.BatchTopKTrainer(**common, k=k, seed=0),
        "gated": lambda: trainers.GatedSAETrainer(**common, **no_sparsity_warmup, seed=0),
        "jumprelu": lambda: trainers.JumpReluTrainer(**common, **no_sparsity_warmup, seed=0),
    }[architecture]()
    bf16 = dtype == "bf16"
    context = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    steps = itertools.count()

    def step(x):
        with context:  # trainSAE: act.to(autocast_dtype), then update under autocast
            return trainer.update(next(steps), x.to(torch.bfloat16) if bf16 else x)

    @torch.no_grad()
    def l0(x):
        x = x.to(device)
        if architecture == "batchtopk":  # its encode defaults to the inference threshold
            f = trainer.ae.encode(x, use_threshold=False)
        else:
            f = trainer.ae.encode(x)
        return float((f != 0).sum(-1).float().mean())

    return Peer(step, l0, {"sae": trainer.ae, "trainer": trainer})


BUILDERS = {
    "saelens": saelens,
    "saelens_sparse": lambda *a: saelens(*a, sparse=True),
    "sparsify": sparsify,
    "dictionary_learning": dictionary_learning,
}


def build(row: str, architecture: str, d_in: int, d_sae: int, k: int, batch: int, device: str,
          dtype: str) -> Peer:
    if architecture not in ROWS[row].architectures:
        raise Unsupported(f"{ROWS[row].label} has no {architecture}")
    return BUILDERS[row](architecture, d_in, d_sae, k, batch, device, dtype)


# --------------------------------------------------------------------- one run (in a subprocess)
def worker(args) -> dict:
    """Trains one (peer, architecture): median step time, peak memory growth, L0."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        peer = build(args.row, args.architecture, args.d_in, args.d_sae, args.k, args.batch, args.device, args.dtype)
    except Unsupported as reason:
        return {"skip": str(reason)}
    total = args.warmup + args.steps
    data = torch.randn(total * args.batch, args.d_in, generator=torch.Generator().manual_seed(0))
    cuda = args.device == "cuda"
    times = []
    with PeakMemory(args.device) as memory:
        for index in range(total):
            x = data[index * args.batch:(index + 1) * args.batch]
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            peer.step(x)
            if cuda:
                torch.cuda.synchronize()
            if index >= args.warmup:
                times.append(time.perf_counter() - start)
    return {"step": statistics.median(times), "memory": memory.bytes, "l0": peer.l0(x)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", required=True, choices=list(ROWS))
    parser.add_argument("--architecture", required=True, choices=ARCHITECTURES)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    print(json.dumps(worker(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
