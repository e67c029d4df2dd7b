"""`TrainingConfig`: how one dictionary is trained, apart from what it is.

The optimiser (Adam's lr, betas, eps), the LR and sparsity-coefficient schedules, the dead-latent
window, the data-dependent initialisation and the resampling of dead latents are the training's,
not the model's: a recipe sets them under `training:` (`--training.lr 1e-3`), a sweep member under
its own `training:` (recipes/sweep.yaml), Python code with `TrainingConfig(lr=1e-3)`.

A field left None takes, in this order, the sweep member's value, the run's `training:` value, the
mechanism's paper default (`Dictionary.recommended_training`, e.g. JumpReLU's lr 7e-5 and
β₁ = 0) and last `DEFAULTS`. `resolve` does that merge and checks the result (one line per bad
value, naming the flag).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dictlearn.dictionaries.model import MOVED_TO_TRAINING, Dictionary
from dictlearn.errors import ConfigError

#: the dead-latent window of long runs (Gao et al. 2024; sparsify, OpenAI)
DEAD_WINDOW_TOKENS = 10_000_000

#: what a field takes when neither the run nor the mechanism sets it
DEFAULTS = dict(
    lr=2e-4, adam_betas=(0.9, 0.999), adam_eps=1e-8, lr_warmup_fraction=0.0, lr_decay_fraction=0.0,
    sparsity_warmup_fraction=0.0, dead_window_tokens=None, init_sample_rows=32_768, init_scale_from_data=False,
    initial_l0=None, sparse_path="auto", resample_every_steps=0, resample_encoder_scale=0.2,
)


@dataclass
class TrainingConfig:
    """How a dictionary is trained; None: the member's, the run's, the mechanism's or `DEFAULTS`.

    Args:
        lr, adam_betas, adam_eps: Adam's settings (one parameter group per dictionary).
        lr_warmup_fraction: linear LR warm-up over this fraction of the run.
        lr_decay_fraction: linear LR decay to 0 over this final fraction of the run.
        sparsity_warmup_fraction: linear warm-up of the sparsity coefficient over this fraction
            of the run.
        dead_window_tokens: a latent that has not fired for this many tokens is dead (AuxK, the
            pre-act loss, resampling, the dead fraction). None: 10M tokens (Gao et al. 2024), or
            a third of the run when the run is shorter (`dead_window_for`).
        init_sample_rows: rows sampled from the data for the data-dependent initialisation (b_dec).
        init_scale_from_data: scale the encoder so the first reconstructions have about the
            target's norm (training/initialise.py `scale_to_data`). Off by default: it rescues short
            runs (`dictlearn compare` turns it on) but lowered long-run feature recovery
            (BatchTopK MMCS 0.92 -> 0.85, benchmarks/RESULTS.md).
        initial_l0: move the thresholds at the start so that this many latents fire per token on
            the sample (`Dictionary.start_at_l0`); None keeps the papers' start. Mechanisms whose L0
            is set by k refuse it.
        sparse_path: "auto" (decode and encoder backward over the active latents only when the
            mechanism's L0 is small enough to gain; docs/performance.md), "always" or "never".
            Results are equal either way up to float rounding.
        resample_every_steps: resample dead latents every N steps (Bricken et al. 2023; 0: off);
            needs a unit-norm decoder (ReLU-L1's `decoder_constraint: unit_norm`).
        resample_encoder_scale: a resampled encoder column's norm, × the mean alive encoder norm
            (0.2, Bricken et al. appendix).
    """

    lr: float | None = None
    adam_betas: tuple[float, float] | None = None
    adam_eps: float | None = None
    lr_warmup_fraction: float | None = None
    lr_decay_fraction: float | None = None
    sparsity_warmup_fraction: float | None = None
    dead_window_tokens: int | None = None
    init_sample_rows: int | None = None
    init_scale_from_data: bool | None = None
    initial_l0: float | None = None
    sparse_path: str | None = None
    resample_every_steps: int | None = None
    resample_encoder_scale: float | None = None

    def given(self) -> dict:
        """The fields set (not None)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


assert set(DEFAULTS) == {f.name for f in dataclasses.fields(TrainingConfig)} == MOVED_TO_TRAINING


def resolve(dictionary: Dictionary, *configs: TrainingConfig | dict | None) -> TrainingConfig:
    """The settings `dictionary` trains with: `DEFAULTS`, then its mechanism's
    `recommended_training()`, then each of `configs` in turn (the run's, then the member's), a
    later set field winning; every field concrete but `dead_window_tokens` and `initial_l0`
    (None is a setting there). Checked against the dictionary (one-line ConfigError)."""
    values = dict(DEFAULTS) | dictionary.recommended_training()
    for config in configs:
        if isinstance(config, dict):
            config = TrainingConfig(**config)
        values |= config.given() if config is not None else {}
    values["adam_betas"] = tuple(values["adam_betas"])
    settings = TrainingConfig(**values)
    check(settings, dictionary)
    return settings


def check(settings: TrainingConfig, dictionary: Dictionary) -> None:
    """One line naming the flag for each value `dictionary` cannot train with."""
    for name in ("lr", "adam_eps", "init_sample_rows", "resample_encoder_scale", "dead_window_tokens"):
        value = getattr(settings, name)
        if value is not None and not value > 0:
            raise ConfigError(f"--training.{name} must be > 0, got {value}")
    for name in ("lr_warmup_fraction", "lr_decay_fraction", "sparsity_warmup_fraction"):
        if not 0.0 <= getattr(settings, name) <= 1.0:
            raise ConfigError(f"--training.{name} must be in [0, 1], got {getattr(settings, name)}")
    if settings.lr_warmup_fraction + settings.lr_decay_fraction > 1.0:
        raise ConfigError("--training.lr_warmup_fraction + --training.lr_decay_fraction must be <= 1")
    if len(settings.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in settings.adam_betas):
        raise ConfigError(f"--training.adam_betas must be two numbers in [0, 1), got {list(settings.adam_betas)}")
    if settings.sparse_path not in ("auto", "always", "never"):
        raise ConfigError(f"--training.sparse_path must be auto, always or never, got {settings.sparse_path!r}")
    l0 = settings.initial_l0
    if l0 is not None and not 0 < l0 < dictionary.d_sae:
        raise ConfigError(f"--training.initial_l0 must be in (0, d_sae = {dictionary.d_sae}), got {l0}")
    if l0 is not None and type(dictionary).start_at_l0 is Dictionary.start_at_l0:
        raise ConfigError(f"--training.initial_l0: {type(dictionary).__name__} sets its L0 by k; drop the flag")
    if settings.resample_every_steps < 0:
        raise ConfigError(f"--training.resample_every_steps must be >= 0, got {settings.resample_every_steps}")
    if settings.resample_every_steps and not dictionary.unit_norm_decoder:
        raise ConfigError("--training.resample_every_steps needs a unit-norm decoder "
                          "(--model.decoder_constraint unit_norm); Bricken et al.'s resampling writes unit rows")


def dead_window_for(run_tokens: int) -> int:
    """The dead-latent window of a run of `run_tokens` training tokens: 10M tokens, or a third of
    the run when that is shorter, so that short runs (a comparison trains dozens of them) see
    their dead latents declared dead, and revived by AuxK, at all.

    Why a third, not less: a shorter window also declares rare latents dead, and AuxK then pulls
    them towards the residual. Measured (dead fraction over 65,536 rows, one seed each): the
    quickstart's TopK transcoder (1,024 latents, 600 steps) 4.0 % with no AuxK (10M window),
    10.7 % with a tenth of the run, 3.9 % with a third; `dictlearn compare`'s BatchTopK at L0 8
    33 %, 24 %, 21 % (benchmarks/RESULTS.md, 2026-12-02)."""
    return max(1, min(DEAD_WINDOW_TOKENS, run_tokens // 3))
