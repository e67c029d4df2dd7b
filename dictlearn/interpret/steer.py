"""Steering: generate from the language model with one latent clamped (`dictlearn steer`).

    from dictlearn.interpret.steer import steer_export
    result = steer_export("runs/cmp/exports/topk_l0-16_s0", feature=123, scale=10, prompt="def main(")
    print(result.side_by_side())

At every position but BOS, the activation at the dictionary's site is decomposed as
x = x̂ + (x − x̂) and latent l's value f_l(x) in x̂ is replaced by c = scale × (its maximum
observed activation), the reconstruction error kept (Templeton et al. 2024, "Scaling
Monosemanticity", feature steering: the Golden Gate Bridge feature clamped to 10× its maximum).
The decoder being linear, that is x' = x + (c − f_l(x)) · d_l with d_l = decode(e_l) − decode(0),
so only that feature changes. For a transcoder the same happens to the MLP's output: its latent,
encoded from the MLP's input, is clamped and y' = y + (c − f_l) · d_l. Greedy decoding, clean
and steered, each step a full forward of the text so far (the embedded model is small).

The measured effect, on the clean text (prompt + clean continuation), at each of its positions:
the mean KL(clean ‖ steered) of the next-token distributions, and the mean change in
log-probability of the latent's top promoted tokens by the logit lens (directions.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dictlearn.downstream import Replacement, SpliceSite, check_site_widths, run_replaced
from dictlearn.errors import ConfigError
from dictlearn.interpret.directions import decoder_direction, top_tokens, unembedding

DEFAULT_TOKENS = 48
MAX_ROWS = 200_000  # rows read from --data to measure a maximum, as `dictlearn inspect` reads by default


def clamp_replacement(dictionary, feature: int, target: Callable[[Tensor], Tensor]) -> Replacement:
    """`new(source, clean)` for `run_replaced`: clean + (target(f) − f) · d_feature, where f is the
    latent's value on `source` [..., d_in] and `target(f)` the value to clamp it to (same shape)."""
    direction = decoder_direction(dictionary, feature)[0]

    def new(source: Tensor, clean: Tensor) -> Tensor:
        flat = source.reshape(-1, source.shape[-1]).to(direction.dtype)
        f = dictionary.encode(flat)[:, feature]
        delta = (target(f) - f)[:, None] * direction
        return clean + delta.reshape(clean.shape).to(clean.dtype)

    return new


def constant(value: float) -> Callable[[Tensor], Tensor]:
    return lambda f: torch.full_like(f, value)


@torch.no_grad()
def generate(model, ids: list[int], tokens: int, stop: int | None, forward: Callable[[Tensor], Tensor]) -> list[int]:
    """Greedy: `tokens` new ids after `ids` (fewer if `stop` is generated); forward(ids [1, n]) -> logits."""
    device = next(model.parameters()).device
    out = list(ids)
    for _ in range(tokens):
        logits = forward(torch.tensor([out], device=device))[0, -1]
        out.append(int(logits.argmax()))
        if stop is not None and out[-1] == stop:
            break
    return out[len(ids):]


@dataclass
class SteerResult:
    feature: int
    scale: float
    value: float  # the clamp value c = scale × max_activation
    max_activation: float
    max_source: str  # where the maximum came from
    site: SpliceSite
    prompt: str
    clean: str  # the continuations (the prompt not repeated)
    steered: str
    kl: float  # mean KL(clean ‖ steered) per position of the clean text, nats
    positions: int
    promoted: list[tuple[str, float]] = field(default_factory=list)  # (token text, mean Δ log-prob)
    promoted_mass: float = 0.0  # mean Δ log P(any of the promoted tokens)

    def summary(self) -> str:
        what = "transcoder writing " if self.site.read else "SAE at "
        return (f"latent {self.feature} clamped to {self.scale:g} × {self.max_activation:.4g} = {self.value:.4g} at every "
                f"position ({what}{self.site.write}); max activation from {self.max_source}")

    def effect(self) -> str:
        tokens = ", ".join(f"{text!r} {delta:+.2f}" for text, delta in self.promoted)
        return (f"effect over the clean text's {self.positions} positions: KL(clean ‖ steered) {self.kl:.3f} nats per "
                f"token; mean change in log-prob of the top promoted tokens: {tokens} (together {self.promoted_mass:+.2f})")

    def side_by_side(self, width: int = 48) -> str:
        """The summary, the prompt, the two continuations in columns (spaces shown as ·, line ends
        as ↵) and the effect."""
        left, right = _wrap(self.clean, width), _wrap(self.steered, width)
        rows = [f"{'clean'.ljust(width)} │ steered", f"{'─' * width}─┼─{'─' * width}"]
        rows += [f"{a.ljust(width)} │ {b}" for a, b in zip(left + [""] * (len(right) - len(left)),
                                                         right + [""] * (len(left) - len(right)))]
        return "\n".join([self.summary(), f"prompt: {self.prompt!r}", *rows, self.effect()])


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most `width` characters, whitespace made visible (a run of spaces is the
    embedded model's favourite greedy continuation and would otherwise print as nothing)."""
    pieces = text.expandtabs(4).replace(" ", "·").split("\n")
    lines = []
    for i, line in enumerate(pieces):
        line += "↵" if i < len(pieces) - 1 else ""
        lines += [line[j : j + width] for j in range(0, len(line), width)] or [""]
    return lines


# ----------------------------------------------------------------------------- the run
def check_request(scale: float, prompt: str) -> None:
    """One-line errors for a request that would run and print KL nan: a NaN/inf scale clamps the
    latent to NaN/inf, and an empty prompt leaves the clean text without a position to compare."""
    if not math.isfinite(scale):
        raise ConfigError(f"--scale {scale}: must be a finite number (e.g. 10 to amplify, -2 to suppress)")
    if not prompt:
        raise ConfigError("--prompt is empty; give the text to continue, e.g. --prompt 'def '")


@torch.no_grad()
def steer(dictionary, lm, site: SpliceSite, feature: int, scale: float, prompt: str, *, max_activation: float,
          max_source: str = "the caller", tokens: int = DEFAULT_TOKENS, promoted: int = 5,
          allowed: Tensor | None = None) -> SteerResult:
    """Clean and steered greedy continuations of `prompt` with latent `feature` clamped to
    scale × max_activation, and the measured effect. `allowed` [vocab] bool: the tokens the
    promoted list is drawn from (None: all)."""
    check_request(scale, prompt)
    if not 0 <= feature < dictionary.d_sae:
        raise ConfigError(f"--feature {feature}: the dictionary has latents 0..{dictionary.d_sae - 1}")
    model, tokenizer = lm.model, lm.tokenizer
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = ([bos] if bos is not None else []) + list(tokenizer.encode(prompt))
    if not ids:
        raise ConfigError(f"--prompt {prompt!r} gives no tokens and the tokenizer has no BOS token; give more text")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and len(ids) + tokens > limit:
        raise ConfigError(f"--tokens {tokens}: the prompt has {len(ids)} tokens and model {lm.name} takes at most "
                          f"{limit}; shorten the prompt or lower --tokens")
    value = scale * max_activation
    new = clamp_replacement(dictionary, feature, constant(value))
    keep = lambda t: (t == bos) if bos is not None else torch.zeros_like(t, dtype=torch.bool)
    clean_forward = lambda t: model(t, use_cache=False).logits
    steered_forward = lambda t: run_replaced(model, t, site, new, keep(t))
    clean_ids = generate(model, ids, tokens, bos, clean_forward)
    steered_ids = generate(model, ids, tokens, bos, steered_forward)
    text = torch.tensor([ids + clean_ids], device=next(model.parameters()).device)
    kl, deltas, mass, positions = _effect(clean_forward(text)[0], steered_forward(text)[0], ~keep(text)[0],
                                          _promoted_ids(lm, dictionary, feature, promoted, allowed))
    show = lambda t: tokenizer.decode([t])
    return SteerResult(feature, scale, value, max_activation, max_source, site, prompt, tokenizer.decode(clean_ids),
                       tokenizer.decode(steered_ids), kl, positions, [(show(t), d) for t, d in deltas], mass)


def _promoted_ids(lm, dictionary, feature: int, k: int, allowed: Tensor | None) -> list[int]:
    up, _ = top_tokens(unembedding(lm.model).lens(decoder_direction(dictionary, feature))[0], k, allowed)
    return [t for t, _ in up]


def _effect(clean: Tensor, steered: Tensor, steered_at: Tensor, promoted: list[int]):
    """clean, steered: logits [seq, vocab] on the same text; steered_at [seq] bool: the positions
    that were clamped. -> (mean KL(clean ‖ steered), [(token, mean Δ log-prob)], mean Δ log P(set), positions)."""
    lc, ls = clean[steered_at].double().log_softmax(-1), steered[steered_at].double().log_softmax(-1)
    kl = float((lc.exp() * (lc - ls)).sum(-1).mean())
    deltas = [(t, float((ls[:, t] - lc[:, t]).mean())) for t in promoted]
    mass = float((ls[:, promoted].logsumexp(-1) - lc[:, promoted].logsumexp(-1)).mean())
    return kl, deltas, mass, int(steered_at.sum())


# ----------------------------------------------------------------------------- from an export
def steer_export(export, feature: int, scale: float, prompt: str, *, tokens: int = DEFAULT_TOKENS,
                 model: str | None = None, data: str | None = None, input_key: str | None = None,
                 device: str = "cpu") -> SteerResult:
    """`steer` for an export folder (or checkpoint): its model (or `model`), its site, and the
    latent's maximum from `data` when given, else the statistics `dictlearn inspect` recorded in
    the folder, else the activation file the export records."""
    from dictlearn.evaluate import Entry
    from dictlearn.interpret.dashboard import load_checked_model

    check_request(scale, prompt)  # before loading anything
    entry = Entry.from_path(export)
    dictionary = entry.dictionary.to(device).eval()
    if not 0 <= feature < dictionary.d_sae:
        raise ConfigError(f"--feature {feature}: {entry.name} has latents 0..{dictionary.d_sae - 1}")
    name = model or entry.meta.get("model_name")
    if not name:
        raise ConfigError(f"{entry.name} records no model (metadata.model_name); pass --model")
    lm = load_checked_model(entry, name)
    lm.model.to(device)
    site = SpliceSite.from_metadata(entry.meta.get("hook_name"), entry.meta.get("hook_name_out"), dictionary.transcoder)
    check_site_widths(lm, site, torch.zeros(1, 2, dtype=torch.long, device=device), dictionary.d_in,
                      dictionary.d_out, entry.name)  # the model is on `device` now
    top, source, data_used = max_activation(entry, feature, data, input_key, device)
    allowed = _seen_tokens(data_used, lm)
    return steer(dictionary, lm, site, feature, scale, prompt, max_activation=top, max_source=source, tokens=tokens,
                 allowed=allowed)


def max_activation(entry, feature: int, data: str | None, input_key: str | None, device: str):
    """-> (latent `feature`'s maximum, where it came from, the activation file involved or None)."""
    from dictlearn.interpret import export_statistics

    folder = Path(entry.path) if entry.path is not None and Path(entry.path).is_dir() else None
    saved = export_statistics.read(folder) if folder is not None and data is None else None
    if saved is not None:
        value, source, path = float(saved.max_activation[feature]), saved.source, saved.data
    else:
        path = data or entry.data.get("path")
        if not path or not Path(path).is_file():
            raise ConfigError(f"{entry.name}: no recorded maximum activations (run dictlearn inspect on it) and "
                              f"{'--data ' + str(path) + ' does not exist' if path else 'no --data'}; pass --data FILE.h5")
        value, source = measured_max(entry, feature, path, input_key, device)
    if not value > 0:
        raise ConfigError(f"--feature {feature}: latent {feature} never fired ({source}); pick a live latent "
                          "(dictlearn inspect lists them)")
    return value, source, path


def measured_max(entry, feature: int, data: str, input_key: str | None, device: str) -> tuple[float, str]:
    """The latent's maximum over the first MAX_ROWS rows of `data`."""
    from dictlearn.interpret.dashboard import input_array

    inputs = input_array(entry, data, input_key)
    n_rows, top = min(MAX_ROWS, inputs.n_rows), 0.0
    with torch.no_grad():
        for start in range(0, n_rows, 8192):
            z = entry.dictionary.encode(inputs.read(start, min(n_rows, start + 8192)).to(device))
            top = max(top, float(z[:, feature].max()))
    inputs.close()
    return top, f"{data}['{inputs.key}'], first {n_rows:,} rows (measured now)"


def _seen_tokens(data: str | None, lm) -> Tensor | None:
    """The tokens that occur in the activation file's first rows (the logit lens ranks among them)."""
    if data is None or not Path(data).is_file():
        return None
    import h5py

    from dictlearn.interpret.contexts import TokenRows

    with h5py.File(data, "r") as f:
        n_rows = min(MAX_ROWS, len(f["token_ids"])) if "token_ids" in f else 0
    seen = TokenRows(data).seen(n_rows, unembedding(lm.model).W_U.shape[0]) if n_rows else None
    return torch.from_numpy(seen) if seen is not None and seen.any() else None
