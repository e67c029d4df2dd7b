"""circuit-tracer 0.5's own loaders on dictlearn's export, and one attribution graph on the embedded model.

Usage (bench venv: `bash benchmarks/install_peers.sh`, which installs circuit-tracer):

    .bench-venv/bin/python benchmarks/check_circuit_tracer.py [--tokens 100000] [--steps 300] [--out runs/ct]

1. Harvests every layer's MLP input and output of the embedded model (dictlearn/tiny-stdlib) and
   trains, in one sweep, a JumpReLU CLT and four per-layer JumpReLU transcoders (m latents a layer).
2. Exports both with `dictlearn.export_circuit.export_circuit_tracer` and loads them with
   circuit-tracer's cache loader (`load_transcoders_from_cache`, lazy and eager decoders).
3. On the last 2048 rows of every layer's MLP input in the harvest, compares circuit-tracer's
   latents (`encode_layer`) and MLP outputs (`decode`, and the reconstruction of
   `compute_attribution_components`) with dictlearn's: max |Δ| / max |dictlearn's| over every
   layer and row; exits 1 when one is above 1e-5.
4. Builds circuit-tracer's TransformerLens replacement model on the embedded model offline (a
   `HookedTransformerConfig` from the GPT-2 config and the weights converted by TransformerLens'
   `convert_gpt2_weights`, checked against the HF forward), runs `attribute` on one prompt and
   prints `compute_graph_scores` (replacement, completeness) for the CLT and for the set.
Prints one JSON object; --json FILE writes it too.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import h5py
import lightning as L
import torch

from dictlearn import ActivationDataModule, JumpReLUSAE, load
from dictlearn.dictionaries import CrossLayerJumpReLU
from dictlearn.export import export
from dictlearn.export_circuit import export_circuit_tracer
from dictlearn.harvest import harvest, layer_hooks
from dictlearn.models.hooks import standard_hooks
from dictlearn.models.loading import load_model
from dictlearn.training import DictionaryTraining, Member, TrainingConfig

warnings.filterwarnings("ignore")
N_LAYERS, D = 4, 128
PROMPT = "import os\nimport sys\n\n\ndef main():\n    return os.path.join(sys."


def train(lm, acts: Path, tokens: int, steps: int, m: int, lr: float | None = None):
    """(JumpReLU CLT, four JumpReLU transcoders, input hooks, output hooks); the trained ones are
    kept as dictlearn exports beside `acts` and loaded from there by a later run."""
    if not acts.exists():
        harvest(lm, layer_hooks(lm.model, "all"), acts, tokens, 128, progress=False)
    ins = [standard_hooks(lm.model, i)["mlp_in"] for i in range(N_LAYERS)]
    outs = [standard_hooks(lm.model, i)["mlp_out"] for i in range(N_LAYERS)]
    kept = acts.parent / "dictlearn"
    if (kept / "tc3").is_dir():
        return load(kept / "clt"), [load(kept / f"tc{i}") for i in range(N_LAYERS)], ins, outs
    L.seed_everything(0)
    config = None if lr is None else TrainingConfig(lr=lr)  # None: JumpReLU's own (7e-5, for long runs)
    members = {"clt": Member(CrossLayerJumpReLU(n_layers=N_LAYERS, d_in=N_LAYERS * D, d_sae=N_LAYERS * m),
                             ",".join(ins), ",".join(outs), seed=0, training=config)}
    for i in range(N_LAYERS):
        members[f"tc{i}"] = Member(JumpReLUSAE(d_in=D, d_sae=m, transcoder=True), ins[i], outs[i], seed=0,
                                   training=config)
    training = DictionaryTraining(members)
    data = ActivationDataModule(acts, input_key=ins[0], target_key=outs[0], batch_size=1024)
    L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              gradient_clip_val=1.0).fit(training, data)
    clt = training.members["clt"].eval()
    tcs = [training.members[f"tc{i}"].eval() for i in range(N_LAYERS)]
    for name in ("clt", *(f"tc{i}" for i in range(N_LAYERS))):
        export(training.members[name], kept / name)
    return clt, tcs, ins, outs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (b: dictlearn's)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def loader_check(ct, ours, xs: list[torch.Tensor], clt: bool) -> dict:
    """circuit-tracer's latents and outputs against dictlearn's on xs [n, D] per layer."""
    with torch.no_grad():
        ours_z = [ours.encode_layer(i, x) if clt else ours[i].encode(x) for i, x in enumerate(xs)]
        ours_y = [ours.decode_layer(i, ours_z[: i + 1]) if clt else ours[i].decode(ours_z[i], xs[i])
                  for i in range(N_LAYERS)]
        ct_z = [ct.encode_layer(x, i) for i, x in enumerate(xs)]
        stacked = torch.stack(xs)
        ct_y = ct.decode(torch.stack(ct_z), stacked)
        components = ct.compute_attribution_components(stacked, zero_positions=slice(0, 0))
    return {
        "latents_max_rel_diff": max(rel(c, o) for c, o in zip(ct_z, ours_z)),
        "outputs_max_rel_diff": max(rel(ct_y[i], ours_y[i]) for i in range(N_LAYERS)),
        "attribution_reconstruction_max_rel_diff": max(rel(components["reconstruction"][i], ours_y[i])
                                                       for i in range(N_LAYERS)),
        "l0_per_layer": [float((z != 0).sum(1).double().mean()) for z in ours_z],
        "same_active_set": all(bool(((c != 0) == (o != 0)).all()) for c, o in zip(ct_z, ours_z)),
    }


class ByteTokenizerShim:
    """What circuit-tracer asks of a tokenizer: special ids (BOS 256 starts the prompt) and decode."""

    bos_token_id = pad_token_id = eos_token_id = 256
    all_special_ids = [256]
    padding_side = "right"
    vocab_size = 257

    def encode(self, text, **_):
        return list(text.encode())

    def decode(self, ids, **_):
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        ids = [ids] if isinstance(ids, int) else ids
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def replacement_model(lm, transcoders):
    """circuit-tracer's TransformerLens replacement model on the embedded GPT-2, built offline."""
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hf = lm.model.config
    cfg = HookedTransformerConfig(
        n_layers=hf.n_layer, d_model=hf.n_embd, n_ctx=hf.n_positions, n_heads=hf.n_head, d_head=hf.n_embd // hf.n_head,
        d_mlp=hf.n_inner or 4 * hf.n_embd, d_vocab=hf.vocab_size, act_fn=hf.activation_function, eps=hf.layer_norm_epsilon,
        normalization_type="LN", positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        model_name="dictlearn/tiny-stdlib", default_prepend_bos=False, device="cpu", dtype=torch.float32)
    model = TransformerLensReplacementModel(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(lm.model, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    tokens = torch.tensor([[256, *PROMPT.encode()]])
    with torch.no_grad():
        clean_diff = rel(model(tokens), lm.model(tokens).logits)
    model._configure_replacement_model(transcoders)
    model.tokenizer = ByteTokenizerShim()
    return model, tokens[0], clean_diff


def attribution_scores(model, tokens) -> dict:
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores

    start = time.time()
    graph = attribute(tokens, model, max_n_logits=10, desired_logit_prob=0.95, batch_size=256)
    replacement, completeness = compute_graph_scores(graph)
    return {"replacement_score": replacement, "completeness_score": completeness,
            "active_features": int(graph.active_features.shape[0]), "seconds": round(time.time() - start, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--latents", type=int, default=256, help="latents per layer")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: JumpReLU's 7e-5)")
    p.add_argument("--out", default="runs/circuit_tracer")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from circuit_tracer.utils.caching import load_transcoders_from_cache

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(None)
    start = time.time()
    clt, tcs, ins, outs = train(lm, out / "acts.h5", args.tokens, args.steps, args.latents, args.lr)
    result = {"tokens": args.tokens, "steps": args.steps, "latents_per_layer": args.latents, "lr": args.lr,
              "train_seconds": round(time.time() - start)}
    attrs = [{"model_name": lm.name, "hook_name": h} for h in ins]
    export_circuit_tracer([clt], out / "ct" / "clt", attrs[:1])
    export_circuit_tracer(tcs, out / "ct" / "plt", attrs)
    with h5py.File(out / "acts.h5") as f:  # the last 2048 rows of every layer's MLP input
        xs = [torch.from_numpy(f[h][-2048:]).float() for h in ins]
    import circuit_tracer

    result["circuit_tracer_version"] = getattr(circuit_tracer, "__version__", "0.5.0")
    for name, ours, is_clt in (("clt", clt, True), ("plt", tcs, False)):
        for lazy in (True, False):
            ct, _ = load_transcoders_from_cache(name, cache_dir=out / "ct", device=torch.device("cpu"),
                                                dtype=torch.float32, lazy_decoder=lazy)
            result[f"{name}_loader{'_lazy' if lazy else ''}"] = loader_check(ct, ours, xs, is_clt)
            print(name, "lazy" if lazy else "eager", json.dumps(result[f"{name}_loader{'_lazy' if lazy else ''}"]),
                  flush=True)
        model, tokens, clean = replacement_model(lm, ct)
        result["tl_vs_hf_logits_max_rel_diff"] = clean
        result[f"{name}_attribution"] = attribution_scores(model, tokens)
    result["prompt"] = PROMPT
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    worst = max(v for key, check in result.items() if "_loader" in key for k, v in check.items() if k.endswith("diff"))
    if worst > 1e-5:
        raise SystemExit(f"circuit-tracer's numbers differ from dictlearn's by {worst:.2e} > 1e-5")


if __name__ == "__main__":
    main()
