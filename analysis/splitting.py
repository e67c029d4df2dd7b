"""Feature splitting across dictionary sizes: decoder-cosine matches between each width and the next.

Drawn when the results hold one architecture at two or more `d_sae` (a `dictlearn compare
--d-sae 512,1024,2048,4096` sweep; lowest seed, the L0 target most widths share). Left: per size
pair, the distribution of each small latent's best cosine in the next larger dictionary (MMCS in
the legend). Right: one family, a small latent and its children in the next size (the large
latents whose best small match it is, cosine >= 0.5), each with its best concept label by F1
(when the activation file carries concept labels) and the bytes its decoder row promotes (logit
lens, when the model loads). The family shown is the labelled parent with the most children,
else the parent with the most children. Matching: dictlearn/interpret/splitting.py.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analysis.cli import module_main
from analysis.metric_plot import site_suffix, site_title
from analysis.style import Drawn, new_figure, save, styled

MIN_COS = 0.5  # a child's cosine with its parent
LABEL_ROWS = 20_000  # first rows of the activation file used to label latents (seconds on a CPU)
MIN_F1 = 0.2  # a concept label below this F1 is not shown


@dataclass
class Member:
    """One latent of a family: its index, cosine with the parent, concept label and promoted bytes."""

    latent: int
    cos: float = 1.0
    concept: tuple[str, float] | None = None
    promoted: list[str] = field(default_factory=list)

    def text(self) -> str:
        label = f"{self.concept[0]} (F1 {self.concept[1]:.2f})" if self.concept and self.concept[1] >= MIN_F1 else "—"
        bytes_ = " ".join(self.promoted[:4])
        return f"#{self.latent}  {label}" + (f"   promotes {bytes_}" if bytes_ else "")


@dataclass
class Family:
    small: int
    large: int
    parent: Member
    children: list[Member]


def ladder_lines(lines: list[dict]) -> tuple[str, dict[int, dict]] | None:
    """(architecture, {d_sae: line}) of the architecture with the most widths (>= 2), else None."""
    by_arch: dict[str, dict[int, dict]] = defaultdict(dict)
    targets = Counter((l["architecture"], l.get("l0_target")) for l in lines if l.get("export"))
    for line in sorted(lines, key=lambda l: (l.get("seed") or 0)):
        arch, d_sae = line["architecture"], line.get("d_sae")
        best_target = max((t for (a, t), _ in targets.items() if a == arch), key=lambda t: targets[(arch, t)],
                          default=None)
        if d_sae and line.get("export") and line.get("l0_target") == best_target:
            by_arch[arch].setdefault(int(d_sae), line)
    arch = max(by_arch, key=lambda a: len(by_arch[a]), default=None)
    return (arch, by_arch[arch]) if arch is not None and len(by_arch[arch]) >= 2 else None


def _labels(dictionaries: dict, data: str | None, input_key: str | None):
    """{d_sae: [(concept, F1)] per latent} from the file's first rows, or None without labels."""
    import torch

    from dictlearn.data.h5 import H5Array
    from dictlearn.interpret.labels import read_concept_labels
    from dictlearn.interpret.splitting import latent_concepts

    if not data or not input_key or not Path(data).is_file():
        return None
    labels = read_concept_labels(data, slice(0, LABEL_ROWS))
    if labels is None:
        return None
    array = H5Array(data, input_key)
    x = array.read(0, min(LABEL_ROWS, array.n_rows))
    array.close()
    known = torch.from_numpy(labels.labelled[: len(x)])
    values = torch.from_numpy(labels.values[: len(x)])[known]
    found = {}
    with torch.no_grad():
        for d_sae, dictionary in dictionaries.items():
            fires = torch.cat([dictionary.encode(part) != 0 for part in x.split(4096)])[known]
            found[d_sae] = latent_concepts(fires, values, labels.names)
    return found


def _lens(line: dict):
    """A function latent directions [n, d] -> promoted bytes (top 4 each), or None without a model."""
    name = line.get("model_name") or line.get("model")
    if not name:
        return None
    try:
        from dictlearn.interpret.contexts import token_display
        from dictlearn.interpret.directions import top_tokens, unembedding
        from dictlearn.models.loading import load_model

        lm = load_model(name)
        lens, show = unembedding(lm.model), token_display(lm.tokenizer)
    except Exception:  # no model recorded or it does not load: the family is drawn without bytes
        return None

    def promoted(directions):
        return [[show(t) for t, _ in top_tokens(logits, 4)[0]] for logits in lens.lens(directions)]

    return promoted


def find_family(lines_by_size: dict[int, dict]) -> tuple[list, Family]:
    """Load the ladder's exports, match them, pick and label a family. -> (SizePairs, Family)."""
    from dictlearn.export import load
    from dictlearn.interpret.splitting import size_ladder

    dictionaries = {d: load(line["export"]) for d, line in lines_by_size.items()}
    pairs = size_ladder({d: m.W_dec for d, m in dictionaries.items()})
    first = pairs[0]
    line = lines_by_size[first.small]
    labels = _labels({first.small: dictionaries[first.small], first.large: dictionaries[first.large]},
                     line.get("data"), line.get("input_key"))
    sizes = first.family_sizes(MIN_COS).double()
    if labels is not None:  # prefer a parent that is labelled, then the larger family
        f1 = np.array([v for _, v in labels[first.small]])
        score = sizes.numpy() * (1.0 + 10.0 * ((sizes.numpy() >= 2) & (f1 >= MIN_F1)) * f1)
    else:
        score = sizes.numpy()
    parent = int(np.argmax(score))
    children = first.children(parent, MIN_COS)
    members = [Member(parent)] + [Member(i, c) for i, c in children]
    promoted = _lens(line)
    for role, member in enumerate(members):
        width = first.small if role == 0 else first.large
        if labels is not None:
            member.concept = labels[width][member.latent]
        if promoted is not None:
            W = dictionaries[width].W_dec.detach()
            member.promoted = promoted(W[member.latent : member.latent + 1])[0]
    return pairs, Family(first.small, first.large, members[0], members[1:])


@styled
def draw_figure(pairs, family: Family | None, architecture: str, site=None):
    fig, (left, right) = new_figure(ncols=2, height_in=3.6)
    bins = np.linspace(0, 1, 41)
    for pair in pairs:
        left.hist(pair.max_cos.numpy(), bins=bins, histtype="step", density=True, linewidth=1.4,
                  label=f"{pair.small} → {pair.large}: MMCS {pair.mmcs:.3f}")
    left.set_xlabel("best decoder cosine of a small latent in the next size")
    left.set_ylabel("density")
    left.set_title(f"{architecture}: best match in the next size"
                   + (f"\n{site_title(site)}" if site is not None else ""))
    left.set_ylim(0, left.get_ylim()[1] * 1.4)  # room for the legend above the bars
    left.legend(frameon=False, loc="upper right", fontsize=7.5)
    right.axis("off")
    if family is not None:
        rows = [f"d_sae {family.small}  parent  {family.parent.text()}", f"d_sae {family.large}  children (cosine):"]
        rows += [f"   {m.cos:.2f}  {m.text()}" for m in family.children[:10]]
        if len(family.children) > 10:
            rows.append(f"   … {len(family.children) - 10} more")
        right.set_title(f"latent {family.parent.latent} and its children")
        right.text(0.0, 1.0, "\n".join(rows), va="top", ha="left", family="monospace", fontsize=7.2,
                   transform=right.transAxes)
    return fig


SAME_INDEX_NOTE = 0.2  # above this share of same-index matches, the figure carries a note


def same_index_fraction(pair) -> float:
    """Share of small latents whose best large match has the same index: a dictionary's initial
    decoder rows are drawn from its seed alone (`Dictionary.reset_parameters`), so two widths of
    one seed start with the same first rows, and a short run keeps them close."""
    import torch

    index = torch.arange(pair.large)
    hits = (pair.parent == index) & (index < pair.small)  # large latent j's best small match is j
    return float(hits.sum()) / pair.small


def draw(lines: list[dict], out_dir: Path, notes: list[str], site=None) -> list[Drawn]:
    """The splitting figure of the results' size ladder; [] when no architecture has two widths."""
    ladder = ladder_lines(lines)
    if ladder is None:
        return []
    architecture, by_size = ladder
    try:
        pairs, family = find_family(by_size)
    except Exception as error:  # an export moved or unreadable: a note, not a failed report
        notes.append(f"splitting figure skipped: {str(error).splitlines()[0]}")
        return []
    shared = same_index_fraction(pairs[0])
    if shared > SAME_INDEX_NOTE:
        notes.append(f"splitting: {shared:.0%} of the d_sae {pairs[0].small} latents match the latent of the same "
                     f"index at d_sae {pairs[0].large}: widths trained from one seed share their first initial "
                     "decoder rows, so short runs match by initialisation, not by splitting; train longer or give "
                     "each width its own seed")
    fig = draw_figure(pairs, family, architecture, site)
    stem = f"splitting{site_suffix(site)}"
    widths = " → ".join(str(p.small) for p in pairs) + f" → {pairs[-1].large}"
    caption = (f"Feature splitting of {architecture} across d_sae {widths}: each small latent's best decoder "
               f"cosine in the next size, and latent {family.parent.latent} of d_sae {family.small} with its "
               f"{len(family.children)} children at cosine ≥ {MIN_COS}.")
    return [Drawn(stem, caption, tuple(save(fig, out_dir, stem)), site)]


if __name__ == "__main__":
    sys.exit(module_main(draw, __doc__.splitlines()[0]))
