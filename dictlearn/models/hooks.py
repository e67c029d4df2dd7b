"""Named activation sites in a PyTorch model: read them (harvest) and replace them (splice).

A *hook name* is a module path plus a site: ``transformer.h.2`` is the output of block 2 (the
residual stream after it), ``transformer.h.2.mlp:input`` the MLP's first positional input
(post-LayerNorm in GPT-2, Pythia and Llama) and ``transformer.h.2.mlp:output`` (or just
``transformer.h.2.mlp``) its output. HDF5 datasets written by harvest carry the same names.

Plain forward hooks and pre-hooks do the work, so any `nn.Module` is hooked the same way; a
module whose output is a tuple (attention blocks in some versions of transformers) is read and
replaced at its first element.

    with capture(model, ["transformer.h.1"]) as acts:
        model(tokens)
    acts["transformer.h.1"]            # [batch, seq, d_model]

    with splice(model, "transformer.h.1.mlp:output", transcoder, read="transformer.h.1.mlp:input"):
        logits = model(tokens).logits  # the MLP's output replaced by transcoder(MLP input)
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dictlearn.errors import ConfigError

Site = Literal["input", "output"]


@dataclass(frozen=True)
class HookPoint:
    """One activation site: a module path and whether its input or output is meant."""

    module: str
    site: Site = "output"

    @classmethod
    def parse(cls, name: str) -> HookPoint:
        path, _, site = name.strip().partition(":")
        site = site or "output"
        if not path or site not in ("input", "output"):
            raise ConfigError(f"hook {name!r}: expected 'module.path', 'module.path:input' or 'module.path:output'")
        return cls(path, site)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.module}:{self.site}" if self.site == "input" else self.module


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at `path`, or a one-line error that suggests the closest existing paths."""
    modules = dict(model.named_modules())
    if path in modules and path:
        return modules[path]
    close = difflib.get_close_matches(path, [name for name in modules if name], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; list them with dict(model.named_modules())"
    raise ConfigError(f"hook {path!r}: the model has no module at this path{hint}")


def _first_tensor(value: object, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise ConfigError(f"hook {where!r}: the module passes {type(value).__name__}, not a tensor; hook another module")


def _with_first(value: object, tensor: torch.Tensor) -> object:
    """`value` with its (first) tensor replaced by `tensor`."""
    if isinstance(value, torch.Tensor):
        return tensor
    return type(value)((tensor, *value[1:]))  # type: ignore[index]


class _StopForward(Exception):
    """Raised after the deepest captured site so the rest of the model does not run."""


@contextlib.contextmanager
def capture(model: nn.Module, hooks: Sequence[str], stop_after: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Record the activation at each hook during forward passes inside the block.

    Yields a dict filled by each forward: hook name -> tensor [*batch, d] (detached; the last
    forward's value). With ``stop_after=True`` the forward stops right after the last site that
    is read in module order, which saves the rest of the model when only early layers are wanted;
    call the model through `run_until_captured` then.
    """
    points = [HookPoint.parse(name) for name in hooks]
    n_sites = len(set(points))
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def recorder(point: HookPoint):
        name = str(point)

        def read(value: object) -> None:
            acts[name] = _first_tensor(value, name).detach()
            # Stop once every site was read in *this* forward: module order is not completion
            # order (a block's output comes after its MLP's), so count rather than name a last site.
            if stop_after and len(acts) == n_sites:
                raise _StopForward

        if point.site == "input":
            return lambda module, args: read(args)
        return lambda module, args, output: read(output)

    try:
        # Each forward of `model` starts empty, so a value from an earlier forward never counts.
        handles.append(model.register_forward_pre_hook(lambda module, args: acts.clear()))
        for point in points:
            module = resolve_module(model, point.module)
            register = module.register_forward_pre_hook if point.site == "input" else module.register_forward_hook
            handles.append(register(recorder(point)))
        yield acts
    finally:
        for handle in handles:
            handle.remove()


def run_until_captured(model: nn.Module, *args, **kwargs) -> None:
    """Call `model` inside `capture(..., stop_after=True)`; returns once every site was read."""
    try:
        model(*args, **kwargs)
    except _StopForward:
        pass


@contextlib.contextmanager
def splice(
    model: nn.Module,
    write: str,
    replace: Callable[[torch.Tensor], torch.Tensor],
    read: str | None = None,
) -> Iterator[None]:
    """Inside the block, the activation at `write` becomes ``replace(a)``.

    `a` is the activation at `read` when given (a transcoder reads the MLP input and writes the
    MLP output), else the activation at `write` itself (an SAE). `replace` maps [*batch, d_in] to
    [*batch, d_out] and is called once per forward; the replacement keeps the original dtype.
    """
    write_point = HookPoint.parse(write)
    read_point = HookPoint.parse(read) if read else None
    cache: dict[str, torch.Tensor] = {}
    handles = []

    def substitute(value: object) -> object:
        original = _first_tensor(value, str(write_point))
        if read_point is None:
            source = original
        elif "read" in cache:
            source = cache.pop("read")
        else:
            raise ConfigError(f"splice: {read_point} is not reached before {write_point} in the forward pass")
        new = replace(source).to(original.dtype)
        if new.shape != original.shape:
            raise ConfigError(f"splice {write_point}: replacement has shape {tuple(new.shape)}, the site {tuple(original.shape)}")
        return _with_first(value, new)

    try:
        if read_point is not None:
            source_module = resolve_module(model, read_point.module)

            def remember(value: object) -> None:
                cache["read"] = _first_tensor(value, str(read_point))

            if read_point.site == "input":
                handles.append(source_module.register_forward_pre_hook(lambda m, args: remember(args)))
            else:
                handles.append(source_module.register_forward_hook(lambda m, args, out: remember(out)))
        target = resolve_module(model, write_point.module)
        if write_point.site == "input":
            handles.append(target.register_forward_pre_hook(lambda m, args: substitute(args)))
        else:
            handles.append(target.register_forward_hook(lambda m, args, out: substitute(out)))
        yield
    finally:
        for handle in handles:
            handle.remove()


# The standard sites of one layer, per model family: residual stream after the block, and the
# MLP's input (after the pre-MLP LayerNorm) and output as a transcoder pair.
_FAMILIES = {
    "gpt2": ("transformer.h.{layer}", "transformer.h.{layer}.mlp"),
    "gpt_neox": ("gpt_neox.layers.{layer}", "gpt_neox.layers.{layer}.mlp"),
    "llama": ("model.layers.{layer}", "model.layers.{layer}.mlp"),
    "mistral": ("model.layers.{layer}", "model.layers.{layer}.mlp"),
    "qwen2": ("model.layers.{layer}", "model.layers.{layer}.mlp"),
    "gemma": ("model.layers.{layer}", "model.layers.{layer}.mlp"),
}


def standard_hooks(model: nn.Module, layer: int) -> dict[str, str]:
    """{"resid": ..., "mlp_in": ..., "mlp_out": ...} hook names for `layer` of a known family."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in _FAMILIES:
        known = ", ".join(sorted(_FAMILIES))
        raise ConfigError(f"model type {family!r} has no standard hooks (known: {known}); pass --hooks explicitly")
    block, mlp = (pattern.format(layer=layer) for pattern in _FAMILIES[family])
    resolve_module(model, block)
    return {"resid": block, "mlp_in": f"{mlp}:input", "mlp_out": mlp}
