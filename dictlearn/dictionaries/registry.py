"""The one registry of sparsity mechanisms: name -> `Dictionary` subclass.

A mechanism class says once, in one class attribute, what the rest of dictlearn needs of it:

    class TopKSAE(Dictionary):
        mechanism = Mechanism("topk")

and everything that keys on mechanisms reads it from here: `dictlearn compare` (the names of
`--architectures`, whether L0 is set by `k` or calibrated, the short-run defaults), its results
lines (k or λ), `SparsityCalibration` (which coefficient to steer, where L0 starts), the public
`dictlearn.TopKSAE` names, and the analysis' colour table (keyed by these names).

The registry is every `Dictionary` subclass imported so far that declares a `mechanism` of its
own: a subclass that does not inherits its parent's declaration (calibration treats it alike)
without becoming a second entry. So a mechanism joins by being imported: the shipped ones are
imported by `dictlearn.dictionaries`, one written elsewhere by its own module (`--model.class_path
my_module.MySAE` imports it, and `dictlearn compare --architectures my_name` then finds it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from dictlearn.dictionaries.model import Dictionary
from dictlearn.errors import ConfigError

# a name `parse_architecture` can split from its mapping suffix (`topk_skip_transcoder`)
_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Mechanism:
    """What a mechanism class declares about itself (`mechanism = Mechanism(...)`).

    Args:
        name: its architecture name in `dictlearn compare --architectures`, results lines
            (`mechanism`), recipes (`recipes/<name>.yaml`) and figures.
        coefficient: the attribute whose λ sets L0 (`l1_coefficient`), which compare calibrates
            to each L0 target; None: the constructor argument `k` sets L0 exactly.
        calibration_start: before calibrating, move the thresholds so that L0 starts at
            target × this (`start_at_l0`, dictlearn/training/calibration.py says why); None
            leaves the start as initialised.
        short_run: constructor arguments `dictlearn compare` sets for this mechanism in its short
            runs (besides the optimiser, which is the same for all); the YAML's `dictionary:`
            overrides them.
        short_run_steps: constructor arguments counted in steps, given as a fraction of compare's
            steps: max(1, ⌊fraction × steps⌋).
    """

    name: str
    coefficient: str | None = None
    calibration_start: float | None = None
    short_run: Mapping[str, object] = field(default_factory=dict)
    short_run_steps: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name) or self.name.endswith("transcoder"):
            raise ConfigError(f"mechanism name {self.name!r}: use lower-case letters, digits and _, not ending in "
                              "'transcoder' (compare adds _transcoder itself)")
        if self.calibration_start is not None and (self.coefficient is None or not self.calibration_start > 0):
            raise ConfigError(f"mechanism {self.name!r}: calibration_start needs a coefficient and must be > 0")
        # read-only: one declaration shared by every instance and every plan
        object.__setattr__(self, "short_run", MappingProxyType(dict(self.short_run)))
        object.__setattr__(self, "short_run_steps", MappingProxyType(dict(self.short_run_steps)))

    @property
    def calibrated(self) -> bool:
        """True when a coefficient, not `k`, sets L0."""
        return self.coefficient is not None


def mechanisms() -> dict[str, type[Dictionary]]:
    """{name: class} of every imported Dictionary subclass that declares its own `mechanism`,
    by name; two classes declaring one name is a one-line ConfigError."""
    found: dict[str, type[Dictionary]] = {}
    for cls in _subclasses(Dictionary):
        declared = vars(cls).get("mechanism")
        if declared is None:
            continue
        if not isinstance(declared, Mechanism):
            raise ConfigError(f"{_path(cls)}.mechanism must be a dictlearn.dictionaries.registry.Mechanism")
        first = found.setdefault(declared.name, cls)
        if first is not cls:
            raise ConfigError(f"mechanism {declared.name!r} is declared by {_path(first)} and by {_path(cls)}; "
                              "give one of them another name")
    return dict(sorted(found.items()))


def mechanism_class(name: str) -> type[Dictionary]:
    """The class registered as `name`; an unknown name is a one-line ConfigError listing the known."""
    known = mechanisms()
    if name not in known:
        raise ConfigError(f"unknown mechanism {name!r}; known: {', '.join(known)}")
    return known[name]


def mechanism_of(dictionary: Dictionary | type[Dictionary]) -> Mechanism | None:
    """What a dictionary (or its class) declares or inherits; None for a plain `Dictionary`."""
    cls = dictionary if isinstance(dictionary, type) else type(dictionary)
    return getattr(cls, "mechanism", None)


def _subclasses(cls: type) -> list[type]:
    """Every subclass of `cls`, depth first, each once."""
    seen: dict[type, None] = {}
    stack = list(reversed(cls.__subclasses__()))
    while stack:
        sub = stack.pop()
        if sub not in seen:
            seen[sub] = None
            stack.extend(reversed(sub.__subclasses__()))
    return list(seen)


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
