"""`dictlearn compare --replace mlp`: what it compares, its defaults, checks and plan.

Every MLP of the model is replaced at once (dictlearn/replacement.py) by one of four
*replacements*, trained at matched **total L0 per token** (latents firing per token, summed over
the replaced layers) and ranked on the whole replacement's CE loss recovered and KL:

    topk_transcoder        per-layer TopK transcoders, one per MLP (k = target / layers each)
    topk_skip_transcoder   the same with a linear skip connection (Paulo et al. 2025)
    topk_clt               a TopK cross-layer transcoder, k = target / layers per layer
    jumprelu_clt           a JumpReLU cross-layer transcoder, its λ calibrated to the total target

(Dunefsky et al. 2024 for transcoders, Ameisen et al. 2025 "Circuit Tracing" for CLTs.) Its plan
is dictlearn/compare/replace_plan.py, the run dictlearn/compare/replace_run.py, the report's section
dictlearn/analysis/replacement.py.
Nothing here imports torch: `dictlearn compare --help` reads this module.
"""

from __future__ import annotations

from dictlearn.errors import ConfigError

#: name -> (mechanism, mapping): mapping "transcoder" / "skip_transcoder" is a set of per-layer
#: dictionaries, "clt" one cross-layer transcoder over every layer
REPLACEMENTS = {"topk_transcoder": ("topk", "transcoder"), "topk_skip_transcoder": ("topk", "skip_transcoder"),
                "topk_clt": ("topk", "clt"), "jumprelu_clt": ("jumprelu", "clt")}
KINDS = ("mlp",)
# Defaults (CPU / GPU). Total L0 targets 32, 64, 128: 8, 16, 32 per layer on the embedded model's
# 4 layers, the single-layer comparison's per-layer targets, so one layer of a replacement is
# as sparse as one dictionary there. The CPU width and run length: ~495 CPU-s in all (one
# thread, under load), ~9 minutes projected to the main job's 2-core machine if both cores work,
# ~18 if one does (docs/compare.md, "Replacement models", Budget).
DEFAULTS = {
    "cpu": dict(tokens=160_000, train_tokens=153_600, d_sae=[256], l0=[32, 64, 128]),
    "cuda": dict(tokens=2_000_000, train_tokens=4_096_000, d_sae=[1024], l0=[32, 64, 128, 256]),
}
#: flags of the single-site comparison that mean nothing for a replacement, with why
REFUSED = {
    "layer": ("--layer", "--replace mlp replaces every layer's MLP"),
    "tune_lr": ("--tune-lr", "the learning-rate search is written for single-site dictionaries"),
    "lr_grid": ("--lr-grid", "the learning-rate search is written for single-site dictionaries"),
    "include": ("--include", "outside dictionaries are single-site; a replacement needs one per layer"),
    "l0_scan": ("--l0 scan", "the L0 scan reads single-site decoders"),
}


def resolved_values(values: dict, kind: str) -> dict:
    """CompareConfig's fields (a dict) with --replace's defaults filled where they are None."""
    if values["l0"] == "scan":
        raise ConfigError("--l0 scan: the L0 scan reads single-site decoders; with --replace give total L0 targets, "
                          "e.g. --l0 32,64,128")
    values = dict(values)
    for name, default in DEFAULTS[kind].items():
        if values[name] is None:
            values[name] = list(default) if isinstance(default, list) else default
    if values["architectures"] is None:
        values["architectures"] = list(REPLACEMENTS)
    values["architectures"] = [a.strip() for a in values["architectures"] if a.strip()]
    return values


def check_config(config) -> None:
    """One line for each flag --replace cannot use or value it cannot take (nothing written yet)."""
    if config.replace not in KINDS:
        raise ConfigError(f"--replace {config.replace}: unknown; use --replace mlp (every MLP replaced at once)")
    for name, (flag, why) in REFUSED.items():
        value = getattr(config, name)
        if value not in (None, False, []):
            raise ConfigError(f"{flag} cannot be combined with --replace: {why}; drop {flag}")
    if not config.downstream:
        raise ConfigError("--no-downstream cannot be combined with --replace: the replacement's metrics are "
                          "downstream metrics; drop --no-downstream")
    if config.devices != 1:
        raise ConfigError(f"--devices {config.devices}: --replace trains in one process; drop --devices")
    if config.data is not None and config.corpus is not None:
        raise ConfigError("--corpus chooses what to harvest; with --data nothing is harvested (drop --corpus)")
    if bool(config.input_key) != bool(config.target_key):
        raise ConfigError("--replace --data: give both --input-key (every layer's MLP input, comma-separated in "
                          "layer order) and --target-key (their MLP outputs), or neither (the model's standard hooks)")
    if config.data is None and config.input_key:
        raise ConfigError("--input-key/--target-key choose datasets of --data; without --data the harvested file's "
                          "keys are used (drop them or pass --data FILE.h5)")
    unknown = [a for a in config.architectures if a not in REPLACEMENTS]
    if unknown or not config.architectures:
        raise ConfigError(f"--architectures {','.join(unknown) or '(none)'}: with --replace use some of "
                          f"{', '.join(REPLACEMENTS)}")
    if len(set(config.architectures)) != len(config.architectures):
        raise ConfigError("--architectures: a replacement is named twice; give each once")
    for flag, values in (("--l0", config.l0), ("--d-sae", config.d_sae)):
        if not isinstance(values, list) or not values or any(
                isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
            raise ConfigError(f"{flag} {values}: give positive whole numbers, e.g. {flag} 32,64,128")
    if len(config.d_sae) != 1:
        raise ConfigError(f"--d-sae {','.join(map(str, config.d_sae))}: --replace trains one width (latents per "
                          "layer); give one")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ConfigError("--seeds: give distinct whole numbers, e.g. --seeds 0,1,2")
    for flag, value in (("--tokens", config.tokens), ("--train-tokens", config.train_tokens),
                        ("--batch-size", config.batch_size), ("--contexts", config.contexts)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{flag} {value}: must be a positive whole number")
    if config.train_tokens < config.batch_size:
        raise ConfigError(f"--train-tokens {config.train_tokens} is less than one step (--batch-size "
                          f"{config.batch_size}); raise --train-tokens or lower --batch-size")


def check_targets(config, n_layers: int) -> None:
    """Total L0 targets against the number of layers (known once the model or file is read)."""
    for target in config.l0:
        if target % n_layers:
            raise ConfigError(f"--l0 {target}: a total L0 over {n_layers} layers must be a multiple of {n_layers} "
                              f"(TopK keeps target / {n_layers} latents per layer); e.g. --l0 "
                              f"{','.join(str(n_layers * k) for k in (8, 16, 32))}")
        if target // n_layers >= config.d_sae[0]:
            raise ConfigError(f"--l0 {target}: {target // n_layers} per layer is not below --d-sae {config.d_sae[0]} "
                              "(latents per layer); lower --l0 or raise --d-sae")
