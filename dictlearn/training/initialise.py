"""The data-dependent start of a dictionary, once per run, before the first step.

From a sample of the training data: the data scales (docs/conventions.md), b_dec (geometric
median, mean or zero of the scaled target), a transcoder's centred pre-activations, the
mechanism's own start (`initialise_from_sample`), and, when the training asks for them, thresholds
moved to an initial L0 (`initial_l0`) and an encoder scaled to the data (`init_scale_from_data`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dictlearn.dictionaries.init import geometric_median
from dictlearn.dictionaries.model import Dictionary
from dictlearn.errors import ConfigError, DataError
from dictlearn.training.config import TrainingConfig


@torch.no_grad()
def initialise_from_data(dictionary: Dictionary, datamodule, settings: TrainingConfig) -> None:
    """Set `dictionary`'s data scales and b_dec from a sample of the training data.

    `datamodule` offers `d_in`, `d_out`, `target_key`, `path`, `estimate_scales()` and
    `sample_rows(n)` (an `ActivationDataModule` or one of its `view`s); `settings` are resolved."""
    _check_data(dictionary, datamodule)
    input_scale, target_scale = datamodule.estimate_scales()
    dictionary.input_scale.fill_(input_scale)
    dictionary.target_scale.fill_(target_scale)
    x, y = datamodule.sample_rows(settings.init_sample_rows)
    x, y = x.to(dictionary.device) * dictionary.input_scale, y.to(dictionary.device) * dictionary.target_scale
    if dictionary.transcoder:  # centre the pre-activations: no b_dec is subtracted (as sparsify does)
        dictionary.b_enc.copy_(-x.mean(0) @ dictionary.W_enc)
    if dictionary.b_dec_init == "geometric_median":
        dictionary.b_dec.copy_(geometric_median(y))
    elif dictionary.b_dec_init == "mean":
        dictionary.b_dec.copy_(y.mean(0))
    dictionary.initialise_from_sample(x, y)
    if settings.initial_l0 is not None:  # a [rows, d_sae] pre-activation sample of at most 256 MiB
        dictionary.start_at_l0(x[: max(1024, 2**26 // dictionary.d_sae)], settings.initial_l0)
    if settings.init_scale_from_data:
        scale_to_data(dictionary, x, y)
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
