"""A sweep's members and what the trainer keeps for each: `Member` (a dictionary, the data it
reads, its seed and own training settings), `LatentActivity` (dead-latent counters) and
`MemberMetrics` (its torchmetrics)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dictlearn.dictionaries.model import Dictionary
from dictlearn.errors import ConfigError
from dictlearn.metrics import ReconstructionMetrics, SparsityMetrics
from dictlearn.training.config import TrainingConfig

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


@dataclass
class Member:
    """One dictionary of a sweep and the data it reads.

    Args:
        dictionary: the model to train.
        input_key: dataset of its inputs; None: the data module's `input_key`.
        target_key: dataset of its targets (transcoders); None: the data module's `target_key`
            for a transcoder, the input for an SAE.
        seed: draw the initial parameters from this seed, whatever else the process did before
            (None: keep them as constructed). Two members with one seed and shape start equal.
        training: how this member trains where it differs from the run's `training:` (its set
            fields win; `TrainingConfig`).
    """

    dictionary: Dictionary
    input_key: str | None = None
    target_key: str | None = None
    seed: int | None = None
    training: TrainingConfig | None = None


class LatentActivity(nn.Module):
    """A member's dead-latent bookkeeping (checkpointed): training tokens since each latent last fired."""

    def __init__(self, d_sae: int) -> None:
        super().__init__()
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))

    @torch.no_grad()
    def update(self, fire_counts: Tensor, n_tokens: int) -> None:
        """fire_counts [d_sae] over n_tokens tokens (summed over DDP ranks by the caller: a latent
        that fired on any rank fired)."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fire_counts > 0, 0)  # not a boolean index: no device sync

    def dead(self, window: int) -> Tensor:
        """[d_sae] bool: latents that fired in none of the last `window` tokens."""
        return self.tokens_since_fired >= window


class MemberMetrics(nn.Module):
    """One member's torchmetrics: a log interval's train metrics, the dead-latent window, validation."""

    def __init__(self, d_sae: int, d_out: int) -> None:
        super().__init__()
        self.train_reconstruction = ReconstructionMetrics(d_out or None)
        self.train_sparsity = SparsityMetrics(d_sae)
        # Dead/dense fractions need a long window of tokens, logged once per window.
        self.train_density = SparsityMetrics(d_sae)
        self.val_reconstruction = ReconstructionMetrics(d_out or None)
        self.val_sparsity = SparsityMetrics(d_sae)


def as_members(members) -> dict[str, Member]:
    """{name: Member} from a Dictionary, a Member or a mapping of either; names checked."""
    if isinstance(members, (Dictionary, Member)):
        members = {"model": members}
    if not isinstance(members, Mapping) or not members:
        raise ConfigError("a sweep needs at least one member: {name: dictionary}")
    specs = {}
    for name, spec in members.items():
        if not _NAME.match(str(name)):
            raise ConfigError(f"sweep member name {name!r}: use letters, digits, '_' and '-' (it names a folder)")
        specs[str(name)] = spec if isinstance(spec, Member) else Member(spec)
        if not isinstance(specs[str(name)].dictionary, Dictionary):
            raise ConfigError(f"sweep member {name!r} is not a dictlearn Dictionary")
    return specs


def update_activity(activity: Mapping[str, LatentActivity], fire_counts: dict[str, Tensor], n_tokens: int) -> None:
    """Every member's dead-latent counters after a step of `n_tokens` tokens with {name: [d_sae]}
    `fire_counts`; a latent that fired on any rank fired (one all-reduce for all members)."""
    counts = torch.cat([c.to(torch.int64) for c in fire_counts.values()])
    if dist.is_available() and dist.is_initialized():
        total = torch.cat([counts, counts.new_tensor([n_tokens])])
        dist.all_reduce(total)
        counts, n_tokens = total[:-1], int(total[-1])
    for (name, _), part in zip(fire_counts.items(), counts.split([len(c) for c in fire_counts.values()])):
        activity[name].update(part, n_tokens)
