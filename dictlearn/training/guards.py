"""Non-finite guards: training stops before a NaN/Inf reaches the weights.

Lightning alone trains on into NaN weights; these checks name the step, batch and rows instead,
and run before the optimiser step, so no checkpoint ever holds the bad values.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from dictlearn.errors import NonFiniteError


def check_batch_finite(x: Tensor, what: str, step: int, batch_idx: int) -> None:
    """Cheap sum proxy every step; locate the bad rows only when it fails."""
    if torch.isfinite(x.sum()):
        return
    bad_rows = (~torch.isfinite(x)).any(-1).nonzero().flatten()
    if len(bad_rows) == 0:  # the sum overflowed although every value is finite
        return
    raise NonFiniteError(
        f"{what}: NaN/Inf in {len(bad_rows)} of {len(x)} rows of the batch at step {step} (batch {batch_idx}) "
        f"(first: row {bad_rows[0].item()} of the batch); clean or re-harvest the activation file"
    )


def check_gradients_finite(named_parameters: Iterable[tuple[str, Tensor]], step: int, label: str = "") -> None:
    """One cheap sum over all gradients; name the parameters only when it is not finite."""
    named = [(name, p.grad) for name, p in named_parameters if p.grad is not None]
    if not named or torch.isfinite(torch.stack([g.sum() for _, g in named]).sum()):
        return
    bad = [name for name, g in named if not g.isfinite().all()]
    if bad:
        raise NonFiniteError(
            f"{label}step {step}: non-finite gradient in {', '.join(bad)}; "
            "lower --training.lr or check the data; no checkpoint was written for this step"
        )


def raise_nonfinite_loss(losses: dict[str, Tensor], terms: dict[str, dict[str, Tensor]], step: int,
                         batch_idx: int) -> None:
    """After the sum of all members' losses was not finite: name the first member whose loss is
    not, with its loss terms. `losses`/`terms` are keyed by the member's label ("" alone)."""
    for label, loss in losses.items():
        if not torch.isfinite(loss):
            parts = ", ".join(f"{k}={v.item():.4g}" for k, v in terms[label].items())
            raise NonFiniteError(
                f"{label}step {step} (batch {batch_idx}): loss is {loss.item()} "
                f"({parts}); lower --training.lr or check the data scale; no checkpoint was written for this step"
            )
