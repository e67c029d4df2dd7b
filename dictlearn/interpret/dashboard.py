"""Feature dashboards: what a dictionary's latents respond to and what they write (`dictlearn inspect`).

    from dictlearn.interpret.dashboard import InspectOptions, inspect
    inspect("runs/cmp/exports/topk_l0-16_s0", "runs/cmp/activations.h5", "topk.html")

One self-contained HTML page (dashboard_html.py) per dictionary: an index of every alive latent
(density, max activation, best concept where the file holds concept labels), sortable, linking to
a card per chosen latent. A card shows the latent's top-activating contexts, contexts sampled from
equal-width intervals of its activation range, its histogram and density, the tokens its decoder
direction promotes and suppresses (directions.py), its nearest latents by decoder cosine and its
best concept. The statistics come from two streaming passes over the first `rows` rows of the
file (statistics.py); contexts are the file's token ids around each row (contexts.py).

Extra card sections are `SectionMaker`s: callables `(card) -> Section | None` passed to
`build_dashboard`; each adds one titled block. A latent's family across dictionary sizes is one
(families.py: one page per width of a size sweep, each card listing its parent and children).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dictlearn.data.concepts import read_concept_labels
from dictlearn.data.h5 import H5Array, check_activation_file
from dictlearn.errors import ConfigError, DataError, note
from dictlearn.evaluate import Entry
from dictlearn.interpret import export_statistics
from dictlearn.interpret.cards import Card, Dashboard, Interval, SectionMaker
from dictlearn.interpret.contexts import TokenRows, latent_column, read_contexts, token_display
from dictlearn.interpret.dashboard_html import render
from dictlearn.interpret.directions import Unembedding, decoder_direction, nearest_latents, top_tokens, unembedding
from dictlearn.interpret.statistics import LatentStatistics, latent_statistics
from dictlearn.io import atomic_write_text
from dictlearn.metrics.coverage import ConceptCoverage
from dictlearn.models.hooks import HookPoint, resolve_module

DEFAULT_ROWS = 200_000


@dataclass(frozen=True)
class InspectOptions:
    """How to inspect. `dictlearn inspect` has flags for features, cards, rows, model, input_key,
    device and record (`--no-record`); the rest are the page's sizes (contexts per card, bins, ...).

    features: the latents to draw cards for (None: `cards` sampled alive latents plus the
    `extremes` densest and rarest). rows: the first rows of the file to read (None: all).
    model: for the logit lens and the token text (None: the export's, else the file's).
    record: write the maximum activations into the export folder (steering reads them).
    """

    features: tuple[int, ...] | None = None
    cards: int = 32
    extremes: int = 4
    rows: int | None = DEFAULT_ROWS
    top: int = 10
    intervals: int = 5
    per_interval: int = 3
    bins: int = 40
    before: int = 48
    after: int = 24
    lens_tokens: int = 8
    neighbours: int = 6
    model: str | None = None
    input_key: str | None = None
    device: str = "cpu"
    seed: int = 0
    record: bool = True

    def __post_init__(self) -> None:
        for name in ("cards", "top", "intervals", "per_interval", "bins", "lens_tokens", "neighbours", "rows"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0 (got {value})")
        if self.bins % self.intervals:
            raise ConfigError(f"--bins {self.bins} must be a multiple of --intervals {self.intervals}")


# ----------------------------------------------------------------------------- choosing latents
def choose_latents(stats: LatentStatistics, cards: int, extremes: int, seed: int) -> list[tuple[int, str]]:
    """(latent, role) for the default cards: the densest and rarest alive latents and a seeded
    sample of the rest, densest first."""
    alive = torch.nonzero(stats.alive).flatten()
    by_density = alive[stats.density[alive].argsort(descending=True)].tolist()
    chosen = {latent: "densest" for latent in by_density[:extremes]}
    chosen |= {latent: "rarest" for latent in by_density[::-1][:extremes] if latent not in chosen}
    rest = [latent for latent in by_density if latent not in chosen]
    picks = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:cards].tolist()
    chosen |= {rest[i]: "sample" for i in picks}
    return sorted(chosen.items(), key=lambda item: by_density.index(item[0]))


def check_features(features: Sequence[int], d_sae: int, name: str) -> None:
    bad = [f for f in features if not 0 <= f < d_sae]
    if bad:
        raise ConfigError(f"--features {','.join(map(str, bad))}: {name} has latents 0..{d_sae - 1}")


# ----------------------------------------------------------------------------- the page's data
def input_array(entry, data: str, input_key: str | None) -> H5Array:
    """The dataset the dictionary encodes, checked against its width."""
    key = input_key or entry.data.get("input_key") or entry.meta.get("hook_name") or "acts"
    try:
        array = H5Array(data, key)
    except DataError as error:
        hint = "; choose the dataset with --input-key" if "not found" in str(error) else ""
        raise DataError(f"{error}{hint}") from None
    if array.d != entry.dictionary.d_in:
        raise DataError(f"{data}: dataset '{key}' has width {array.d} but {entry.name} has d_in="
                        f"{entry.dictionary.d_in}; pass the file or --input-key it was trained on")
    return array


def build_dashboard(entry, data: str, options: InspectOptions = InspectOptions(), lm=None,
                    sections: Sequence[SectionMaker] = (), also: Sequence[int] = ()) -> Dashboard:
    """The dashboard of `entry` (a dictlearn.evaluate.Entry) on the file `data`.

    lm: a loaded LanguageModel for the logit lens and the token text (None: neither). When the
    file holds concept labels, each latent's best concept and F1 on the rows inspected are shown.
    also: latents that get a card besides the chosen ones (role "family": families.py).
    """
    dictionary = entry.dictionary.to(options.device).eval()
    if options.features is not None:
        check_features(options.features, dictionary.d_sae, entry.name)
    inputs = input_array(entry, data, options.input_key)
    n_rows = inputs.n_rows if options.rows is None else min(options.rows, inputs.n_rows)
    observers, best_concepts = concept_coverage(data, dictionary.d_sae, n_rows)
    started = time.perf_counter()
    stats = latent_statistics(dictionary.encode, inputs.read, dictionary.d_sae, 0, n_rows, top=options.top,
                              bins=options.bins, intervals=options.intervals, per_interval=options.per_interval,
                              seed=options.seed, device=options.device, observers=observers)
    seconds = time.perf_counter() - started
    if options.features is not None:
        chosen = [(f, "chosen") for f in dict.fromkeys(options.features)]
    else:
        chosen = choose_latents(stats, options.cards, options.extremes, options.seed)
    if also:
        check_features(also, dictionary.d_sae, entry.name)
        taken = {latent for latent, _ in chosen}
        chosen += [(latent, "family") for latent in dict.fromkeys(also) if latent not in taken]
    lens = unembedding(lm.model) if lm is not None else None
    show = token_display(lm.tokenizer if lm is not None else None)
    tokens = TokenRows(data)
    # the lens ranks the tokens that occur in these rows: a token the model never saw (most control
    # bytes of the byte vocabulary) keeps its random initial unembedding, and would top every list
    seen = tokens.seen(n_rows, lens.W_U.shape[0]) if lens is not None else None
    allowed = torch.from_numpy(seen) if seen is not None and seen.any() else None
    neighbours = nearest_latents(dictionary.W_dec, [latent for latent, _ in chosen], options.neighbours)
    cards = [_card(dictionary, stats, latent, role, inputs, tokens, show, (lens, allowed), neighbours[latent], options,
                   n_rows) for latent, role in chosen]
    concepts = best_concepts() if best_concepts is not None else None
    for card in cards:
        card.concept = (concepts or {}).get(card.latent)
        card.extra = [s for s in (make(card) for make in sections) if s is not None]
    inputs.close()
    facts = _facts(entry, data, inputs.key, stats, lm, tokens, seconds)
    return Dashboard(f"dictlearn inspect: {Path(str(entry.path or entry.name)).name}", facts, stats, cards,
                     concepts, _lens_note(lens, allowed), (options.before, options.after))


def _lens_note(lens: Unembedding | None, allowed: torch.Tensor | None) -> str | None:
    if lens is None:
        return None
    among = f"ranked among the {int(allowed.sum())} tokens that occur in these rows" if allowed is not None else \
        "ranked among all tokens"
    return f"{lens.description}; {among}"


def _card(dictionary, stats: LatentStatistics, latent: int, role: str, inputs: H5Array, tokens: TokenRows, show,
          lens: tuple[Unembedding | None, torch.Tensor | None], neighbours, options: InspectOptions,
          n_rows: int) -> Card:
    values = latent_column(dictionary.encode, latent, options.device)
    contexts = lambda rows: read_contexts(tokens, inputs.read_slices, values, rows, n_rows, show,
                                          options.before, options.after)
    top = contexts([r for r in stats.top_rows[latent].tolist() if r >= 0])
    fractions = stats.interval_fractions(latent)
    intervals = [Interval(low, high, fraction, contexts([r for r in rows if r >= 0]))
                 for (low, high), fraction, rows in zip(stats.interval_bounds(latent), fractions,
                                                        stats.sample_rows[latent].tolist())]
    card = Card(latent, role, float(stats.density[latent]), float(stats.max_activation[latent]),
                float(stats.mean_activation[latent]), stats.histogram[latent].tolist(), top, intervals[::-1],
                neighbours=neighbours)
    unembed, allowed = lens
    if unembed is not None:
        up, down = top_tokens(unembed.lens(decoder_direction(dictionary, latent))[0], options.lens_tokens, allowed)
        card.promoted = [(show(t), v) for t, v in up]
        card.suppressed = [(show(t), v) for t, v in down]
    return card


def _facts(entry, data: str, key: str, stats: LatentStatistics, lm, tokens: TokenRows, seconds: float) -> list:
    d = entry.dictionary
    alive = int(stats.alive.sum())
    kind = "transcoder" if d.transcoder else "SAE"
    # the class says what was trained; the SAELens name only how it is stored (BatchTopK as "jumprelu")
    saved = f", saved as SAELens '{entry.cfg['architecture']}'" if entry.cfg.get("architecture") else ""
    facts = [("dictionary", f"{entry.name} ({type(d).__name__}, {kind}{saved}; d_in {d.d_in}, d_sae {d.d_sae})"),
             ("data", f"{data}['{key}'], rows 0–{stats.n_rows - 1:,} ({stats.n_rows:,} rows; statistics in "
                      f"{seconds:.1f} s)"),
             ("alive", f"{alive:,} of {d.d_sae:,} latents fired on these rows ({d.d_sae - alive:,} never)"),
             ("model", lm.name if lm is not None else "none (no logit lens; pass --model)")]
    if not tokens.has_tokens:
        facts.append(("contexts", "the file stores no token_ids: contexts show row numbers only"))
    return facts


# ----------------------------------------------------------------------------- the command's work
def inspect(export, data: str | Path, out: str | Path, options: InspectOptions = InspectOptions(),
            sections: Sequence[SectionMaker] = (), echo: bool = True, lm=None) -> Path:
    """Write the dashboard of `export` (a folder, checkpoint or evaluate.Entry) on `data` to `out`.

    lm: an already loaded LanguageModel to use (None: load the one `options.model`, the export or
    the file names)."""
    data = check_activation_file(data)
    entry = export if isinstance(export, Entry) else Entry.from_path(export)
    if lm is None:
        file_model = input_array(entry, data, options.input_key).attrs().get("model_name")
        lm = load_checked_model(entry, options.model or entry.meta.get("model_name") or file_model, data)
    else:
        check_hooks(entry, lm)
    dashboard = build_dashboard(entry, data, options, lm, sections)
    atomic_write_text(out, render(dashboard))
    # into dictlearn's own exports only: another library's folder (SAELens, sparsify, ...) is left as it is
    if options.record and entry.path is not None and Path(entry.path).is_dir() \
            and entry.cfg.get("format", "dictlearn") == "dictlearn":
        stats = dashboard.stats
        try:
            export_statistics.record(entry.path, stats.max_activation, stats.fire_count, data,
                                     input_array(entry, data, options.input_key).key, stats.first_row, stats.n_rows)
        except OSError as error:  # a read-only export: the page is written, steering will measure instead
            note(f"could not record the latents' maxima in {entry.path} ({error.strerror}); "
                  "dictlearn steer will measure them from --data")
    if echo:
        print(f"dictlearn: dashboard of {len(dashboard.cards)} latents written to {out}", file=sys.stderr)
    return Path(out)


def load_checked_model(entry, name: str | None, data: str | None = None):
    """The language model `name` (None when no model is known: a note), after checking that it
    has the modules of the export's hooks."""
    if not name:
        note(f"no model recorded in {entry.name} or {data or 'the data'} and no --model: no logit lens, "
              "tokens shown as ids")
        return None
    from dictlearn.models.loading import load_model

    lm = load_model(name)
    check_hooks(entry, lm)
    return lm


def check_hooks(entry, lm) -> None:
    """The model has a module at each of the export's hooks, or a one-line ConfigError."""
    for field_name in ("hook_name", "hook_name_out"):
        hook = entry.meta.get(field_name)
        if hook:
            try:
                resolve_module(lm.model, HookPoint.parse(hook).module)
            except ConfigError as error:
                raise ConfigError(f"--model {lm.name}: {entry.name} was trained at {hook!r}, which this model "
                                  f"lacks ({error}); pass the model it was trained on") from None


def concept_coverage(data: str, d_sae: int, n_rows: int):
    """(observers, best) for the file's concept labels (dictlearn.data.concepts) of rows [0, n_rows):
    the observer counts "fires" against each label over the labelled rows of the first pass
    (ConceptCoverage, the F1 of concept coverage) and best() -> {latent: (concept, F1)} for the
    latents that fired. ((), None) when the file holds no labels."""
    labels = read_concept_labels(data, slice(0, n_rows))
    if labels is None or not labels.names:
        return (), None
    coverage = ConceptCoverage(d_sae, len(labels.names))

    def observe(first: int, z: torch.Tensor) -> None:
        keep = labels.labelled[first : first + len(z)]
        coverage.update((z > 0).cpu()[torch.from_numpy(keep)], labels.values[first : first + len(z)][keep])

    def best() -> dict[int, tuple[str, float]]:
        result = coverage.compute()
        return {int(latent): (labels.names[result.best_concept[latent]], float(result.best_f1[latent]))
                for latent in result.alive.nonzero()[0]}

    return (observe,), best
