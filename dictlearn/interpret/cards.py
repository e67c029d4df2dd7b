"""What a dashboard page shows, as data: the cards of chosen latents and the page around them.

`dashboard.build_dashboard` fills them from an export and an activation file; `dashboard_html.render`
turns them into the page. Kept apart so that the two modules do not import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from dictlearn.interpret.contexts import Context
from dictlearn.interpret.statistics import LatentStatistics


@dataclass
class Section:
    """An extra block on a card: a title and HTML made by its `SectionMaker` (escaped by it)."""

    title: str
    html: str


@dataclass
class Interval:
    low: float
    high: float
    fraction: float  # of the latent's firing rows that fall in [low, high)
    contexts: list[Context]


@dataclass
class Card:
    latent: int
    role: str  # "densest", "rarest", "sample", "chosen" or "family"
    density: float
    max_activation: float
    mean_activation: float
    histogram: list[int]
    top: list[Context]
    intervals: list[Interval]
    promoted: list[tuple[str, float]] = field(default_factory=list)  # (token text, logit change)
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    neighbours: list[tuple[int, float]] = field(default_factory=list)  # (latent, decoder cosine)
    concept: tuple[str, float] | None = None  # (concept name, F1)
    extra: list[Section] = field(default_factory=list)


SectionMaker = Callable[[Card], "Section | None"]


@dataclass
class Dashboard:
    title: str
    facts: list[tuple[str, str]]  # (what, value) shown at the top
    stats: LatentStatistics
    cards: list[Card]
    concepts: dict[int, tuple[str, float]] | None  # best (concept, F1) per latent; None without labels
    lens: str | None  # how the logit lens was computed (None: no model)
    window: tuple[int, int] = (48, 24)  # context tokens shown before and after the activating one
