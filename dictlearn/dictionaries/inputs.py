"""What a Dictionary's public methods accept: any `[..., width]` floating tensor on its device.

`encode`, `decode`, `forward` (and Matryoshka's `prefix_reconstructions`) take a user's tensor:
one vector `[width]` or a batch `[..., width]` with any leading dims (as SAELens does). `as_rows`
flattens it to the `[rows, width]` matrix the model computes on, in the parameters' dtype, and
`Rows.restore` puts the leading dims and the caller's dtype back. Anything else is one
`InputError` line naming the width expected and the shape, dtype or device received.

Dtypes: a floating tensor of another dtype (float64, float16, bfloat16) is cast to the
parameters' dtype (float32 for a loaded export) and the output cast back to the input's dtype;
the arithmetic is the parameters' precision (call `.double()` on the dictionary for float64
arithmetic). Integer, bool and complex tensors are refused. Tensors on another device are
refused, not moved: a silent copy per call would hide a slow loop.

The training step never comes here: it hands the mechanism `[batch, d]` rows the data module
has already checked (training/module.py), so these checks cost nothing per step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dictlearn.errors import InputError


class Rows(NamedTuple):
    """A caller's tensor as `rows [n, width]` in the parameters' dtype, and how to undo that."""

    rows: Tensor
    lead: tuple[int, ...]  # the caller's leading dims ([] for one vector)
    dtype: torch.dtype  # the caller's dtype

    def restore(self, out: Tensor) -> Tensor:
        """out [..., n, m] -> [..., *lead, m] in the caller's dtype (a vector in, a vector out)."""
        return out.reshape(*out.shape[:-2], *self.lead, out.shape[-1]).to(self.dtype)


def as_rows(value, width: int, name: str, where: str, parameter: Tensor) -> Rows:
    """value [..., width] or [width] -> Rows on `parameter`'s device and dtype; an InputError
    naming `where` (e.g. "TopKSAE.encode"), the argument `name` and its expected width otherwise.

    `name` is "x" (width d_in) or "z" (width d_sae): the message calls the width by that name."""
    width_name = {"x": "d_in", "z": "d_sae"}[name]
    expected = f"[..., {width_name}] with {width_name}={width}"
    if not isinstance(value, Tensor):
        hint = "torch.from_numpy(" + name + ")" if type(value).__module__ == "numpy" else f"torch.as_tensor({name})"
        raise InputError(f"{where}: {name} is a {type(value).__module__}.{type(value).__qualname__}, "
                         f"not a torch.Tensor; pass {hint} of shape {expected}")
    if value.dim() == 0 or value.shape[-1] != width:
        raise InputError(f"{where}: {name} has shape {tuple(value.shape)}; expected {expected} "
                         f"(one vector [{width}] or a batch of them)")
    if not value.dtype.is_floating_point:
        raise InputError(f"{where}: {name} has dtype {value.dtype}; pass floating-point activations "
                         f"(e.g. {name}.float())")
    if value.device != parameter.device:
        raise InputError(f"{where}: {name} is on {value.device} but the dictionary is on {parameter.device}; "
                         f"move one of them ({name}.to(dictionary.device) or dictionary.to({name}.device))")
    rows = value.reshape(-1, width) if value.dim() != 2 else value
    return Rows(rows.to(parameter.dtype), tuple(value.shape[:-1]), value.dtype)


def skip_rows(x, lead: tuple[int, ...], where: str, d_in: int, parameter: Tensor) -> Tensor:
    """A skip transcoder's decode(z, x): x as [batch, d_in] rows matching z's leading dims `lead`;
    an InputError line when it is missing or of another shape."""
    if x is None:
        raise InputError(f"{where}: a skip transcoder's output needs its input; pass decode(z, x) with x "
                         f"[..., d_in] with d_in={d_in}, the x that z was encoded from")
    rows = as_rows(x, d_in, "x", where, parameter)
    if rows.lead != lead:
        raise InputError(f"{where}: x has shape {tuple(x.shape)} but z has leading dims {lead}; "
                         "pass the x that z was encoded from")
    return rows.rows
