"""Each member's optimiser and clipping, as it would have them alone: one Adam parameter group per
member (its lr, betas, eps), its own warm-up/decay LR factor, its gradients clipped by their own
norm."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from functools import partial

import torch
from torch import nn

from dictlearn.dictionaries.init import warmup_decay_factor


def total_steps(trainer) -> int:
    """The steps the schedules span: the trainer's max_steps, else its estimate (1 without a trainer)."""
    if trainer is None:
        return 1
    steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
    return max(1, int(steps)) if math.isfinite(steps) else 1


def adam_with_schedules(members: Mapping[str, nn.Module], settings: Mapping, total: int, fused: bool) -> dict:
    """Lightning's `configure_optimizers` answer for {name: dictionary} `members` trained `total`
    steps with their {name: TrainingConfig} `settings`: one Adam, one LambdaLR factor per group."""
    chosen = [settings[name] for name in members]
    groups = [
        {"params": list(m.parameters()), "lr": s.lr, "betas": s.adam_betas, "eps": s.adam_eps}
        for m, s in zip(members.values(), chosen)
    ]
    optimizer = torch.optim.Adam(groups, fused=fused or None)
    factors = [
        partial(warmup_decay_factor, total=total, warmup=s.lr_warmup_fraction * total,
                decay=s.lr_decay_fraction * total)
        for s in chosen
    ]  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fused_adam_possible(parameters: Iterable[torch.Tensor], precision: str) -> bool:
    """Fused Adam: one kernel per parameter instead of ~8 passes (~5x less time on CPU;
    deterministic). Not under fp16 `16-mixed`, whose loss scaler must unscale the gradients
    before clipping (a fused optimizer unscales inside its step)."""
    return precision != "16-mixed" and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                           for p in parameters)


def clip_members(members: Iterable[nn.Module], norms: list | None, clip_val: float | None,
                 algorithm: str | None) -> None:
    """Clip each member's gradients by its own norm (or value). `norms`: [(grads, their norms)]
    per member, computed once for the finite check (None: computed here, clip_grad_norm_).
    Directly, not through Lightning's plugin, which refuses any optimizer that unscales its own
    gradients (fused Adam) under mixed precision; gradients are already unscaled here."""
    if not clip_val:
        return
    if algorithm == "value":
        for member in members:
            torch.nn.utils.clip_grad_value_(member.parameters(), clip_val)
        return
    if norms is None:  # no on_before_optimizer_step (a loop of its own)
        for member in members:
            torch.nn.utils.clip_grad_norm_(member.parameters(), clip_val)
        return
    for member_grads, member_norms in norms:  # clip_grad_norm_'s arithmetic, on the norms above
        if member_grads:
            total = torch.linalg.vector_norm(torch.stack(member_norms), 2.0)
            factor = torch.clamp(clip_val / (total + 1e-6), max=1.0)
            # a factor of exactly 1 leaves every gradient as it is (x * 1.0 == x, bit for bit): on
            # CPU, where reading it costs no device sync, skip the pass (~0.1 ms a member-step)
            if factor.device.type == "cpu" and factor.item() == 1.0:
                continue
            torch._foreach_mul_(member_grads, factor)


def split(items: list, sizes: list[int]) -> list[list]:
    """items cut into consecutive runs of `sizes`."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [items[start:start + size] for start, size in zip(starts, sizes)]
