"""The data-dependent start of a dictionary, once per run, before the first step.

From a sample of the training data: the data scales (docs/conventions.md), b_dec (geometric
median, mean or zero of the scaled target), a transcoder's centred pre-activations, the
mechanism's own start (`initialise_from_sample`), and, when the training asks for them, thresholds
moved to an initial L0 (`initial_l0`) and an encoder scaled to the data (`init_scale_from_data`).
The members of a sweep that read the same datasets share one sample and one geometric median
(`SharedSample`): the same values each would compute alone, computed once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictlearn.dictionaries.init import geometric_median
from dictlearn.dictionaries.model import Dictionary
from dictlearn.errors import ConfigError, DataError
from dictlearn.training.config import TrainingConfig


# `scale_to_data` matches two means of row norms: on every 8th row of the 32,768-row sample its
# scale moved by at most 0.13 % on six TopK/BatchTopK starts of the default compare, while seeds
# differ by 2-5 % (benchmarks/RESULTS.md, seventh session); the dense forward over the whole
# sample was 8 of a sweep start's 10 s on one thread.
SCALE_SAMPLE_ROWS = 4096


class SharedSample:
    """The scaled samples and geometric medians of one run's data-dependent starts, by datasets,
    sample size and device: members reading the same datasets get the very tensors a member alone
    would compute (each is a function of the file, the seed and the size), computed once. Lives
    for one `on_fit_start`, whose views share one data module (one seed and split); callers must
    not modify what it returns."""

    def __init__(self) -> None:
        self._samples: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._medians: dict[tuple, Tensor] = {}

    def scaled(self, datamodule, n_rows: int, scales: tuple[Tensor, Tensor], device) -> tuple[Tensor, Tensor]:
        """(x [n, d_in], y [n, d_out]): `datamodule.sample_rows(n_rows)` times the input and target
        scales, on `device`."""
        key = self._key(datamodule, n_rows, scales, device)
        if key not in self._samples:
            x, y = datamodule.sample_rows(n_rows)
            self._samples[key] = (x.to(device) * scales[0], y.to(device) * scales[1])
        return self._samples[key]

    def geometric_median(self, datamodule, n_rows: int, scales: tuple[Tensor, Tensor], device) -> Tensor:
        """`geometric_median` of `scaled(...)`'s y: [d_out]."""
        key = self._key(datamodule, n_rows, scales, device)
        if key not in self._medians:
            self._medians[key] = geometric_median(self.scaled(datamodule, n_rows, scales, device)[1])
        return self._medians[key]

    @staticmethod
    def _key(datamodule, n_rows: int, scales: tuple[Tensor, Tensor], device) -> tuple:
        return (datamodule.path, datamodule.input_key, datamodule.target_key, n_rows,
                float(scales[0]), float(scales[1]), str(device))


@torch.no_grad()
def initialise_from_data(dictionary: Dictionary, datamodule, settings: TrainingConfig,
                         shared: SharedSample | None = None) -> None:
    """Set `dictionary`'s data scales and b_dec from a sample of the training data.

    `datamodule` offers `d_in`, `d_out`, `input_key`, `target_key`, `path`, `estimate_scales()`
    and `sample_rows(n)` (an `ActivationDataModule` or one of its `view`s); `settings` are
    resolved; `shared`: the run's other members' samples (None: this member's own)."""
    _check_data(dictionary, datamodule)
    input_scale, target_scale = datamodule.estimate_scales()
    dictionary.input_scale.fill_(input_scale)
    dictionary.target_scale.fill_(target_scale)
    shared = shared if shared is not None else SharedSample()
    sample = (datamodule, settings.init_sample_rows, (dictionary.input_scale, dictionary.target_scale),
              dictionary.device)
    x, y = shared.scaled(*sample)
    if dictionary.transcoder:  # centre the pre-activations: no b_dec is subtracted (as sparsify does)
        dictionary.b_enc.copy_(-x.mean(0) @ dictionary.W_enc)
    if dictionary.b_dec_init == "geometric_median":
        dictionary.b_dec.copy_(shared.geometric_median(*sample))
    elif dictionary.b_dec_init == "mean":
        dictionary.b_dec.copy_(y.mean(0))
    dictionary.initialise_from_sample(x, y)
    if settings.initial_l0 is not None:  # a [rows, d_sae] pre-activation sample of at most 256 MiB
        dictionary.start_at_l0(x[: max(1024, 2**26 // dictionary.d_sae)], settings.initial_l0)
    if settings.init_scale_from_data:
        every = max(1, len(x) // SCALE_SAMPLE_ROWS)  # rows spread over the sample's blocks
        scale_to_data(dictionary, x[::every], y[::every])
    dictionary.data_initialised.fill_(True)


def _check_data(dictionary: Dictionary, datamodule) -> None:
    if datamodule is None:
        raise ConfigError("a dictionary trains from an ActivationDataModule (--data); none was given")
    if (datamodule.d_in, datamodule.d_out) != (dictionary.d_in, dictionary.d_out):
        raise DataError(
            f"{datamodule.path}: data has d_in={datamodule.d_in}, d_out={datamodule.d_out} "
            f"but the model expects d_in={dictionary.d_in}, d_out={dictionary.d_out}; drop --model.d_in/d_out "
            "(they are read from the file) or pick a matching file"
        )
    has_target = getattr(datamodule, "target_key", None) is not None
    if has_target != dictionary.transcoder:
        raise ConfigError(
            "--data.target_key is set but the model is not a transcoder: use recipes/transcoder.yaml "
            "or --model.transcoder true" if has_target else
            "--model.transcoder true needs a target: pass --data.target_key (e.g. the MLP output)"
        )


@torch.no_grad()
def scale_to_data(dictionary: Dictionary, x: Tensor, y: Tensor) -> float:
    """Scale the encoder by s so that, on the sample x [n, d_in], y [n, d_out] (scaled units),
    the first reconstructions have about the target's norm: mean ‖ŷ − b_dec‖ = mean ‖y − b_dec‖.

    Unit-norm decoder rows with k (or half of d_sae) latents active would otherwise start at
    several times the input's norm. Every mechanism's activation is positively homogeneous in
    (encoder weights, encoder biases, thresholds), so the latents, and ŷ − b_dec, scale by s
    exactly (`Dictionary.scale_encoder`). Adam moves each parameter by about lr per step whatever
    its size, so after a scale s < 1 the encoder moves 1/s times faster relative to its size
    (benchmarks/RESULTS.md, session of 2026-12-02: the cause of the scaling's cost to feature
    recovery). -> s."""
    z = dictionary.activate(dictionary.pre_acts(x))
    produced = (z @ dictionary.W_dec).norm(dim=-1).mean()
    wanted = (y - dictionary.b_dec).norm(dim=-1).mean()
    if not (produced > 0 and torch.isfinite(produced) and wanted > 0):
        return 1.0  # nothing fires on the sample (or a degenerate target): leave the init
    scale = float(wanted / produced)
    dictionary.scale_encoder(scale)
    return scale
