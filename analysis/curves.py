"""Training curves: validation FVU against training tokens, one panel per L0 target.

Reads the optional `log_dir` key of a results line: a Lightning CSVLogger version folder
(`.../lightning_logs/version_N`, holding `metrics.csv`) or the `metrics.csv` file itself; a
relative path is taken from the results file's folder. The column is `<member>/val/fvu` for a
sweep member (member = the line's `member`, else its `name`; a log with one such column uses
it), else `val/fvu`. The x axis is `step` × tokens per step: the line's `batch_size`, else
`train_tokens` / the log's last step; with neither, steps. Anything unreadable is a note.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

from matplotlib.figure import Figure

from dictlearn.analysis.cli import module_main
from dictlearn.analysis.metric_plot import site_suffix, site_title
from dictlearn.analysis.results import is_outside, value
from dictlearn.analysis.style import (DPI, WIDTH_IN, Drawn, legend_outside, log_y_axis, save, series_order,
                                      series_style, share_x_label, styled)

PANELS_PER_ROW = 4


def metrics_csv(line: dict) -> Path | None:
    """The line's metrics.csv, or None when it names none."""
    raw = line.get("log_dir")
    if not isinstance(raw, str) or not raw:
        return None
    path = Path(raw)
    if not path.is_absolute():
        path = Path(line.get("_folder", ".")) / path
    return path if path.suffix == ".csv" else path / "metrics.csv"


def fvu_column(columns: list[str], line: dict) -> str | None:
    """Which column holds this dictionary's validation FVU (see the module docstring)."""
    members = [c for c in columns if c.endswith("/val/fvu") and c.count("/") == 2]
    for member in (line.get("member"), line.get("name")):
        if member and f"{member}/val/fvu" in columns:
            return f"{member}/val/fvu"
    if len(members) == 1:
        return members[0]
    return "val/fvu" if "val/fvu" in columns else None


def read_curve(line: dict) -> tuple[list[float], list[float], float | None]:
    """-> (steps, val FVU, tokens per step or None); raises ValueError with a reason to note."""
    path = metrics_csv(line)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as error:
        raise ValueError(f"cannot read {path} ({error.strerror or error})") from None
    # a row longer than the header puts its extra cells under the key None
    column = fvu_column([c for c in rows[0] if isinstance(c, str)] if rows else [], line)
    if column is None:
        raise ValueError(f"{path} has no val/fvu column")
    points = [(_float(row.get("step")), _float(row.get(column))) for row in rows]
    points = sorted((s, y) for s, y in points if s is not None and y is not None)
    if not points:
        raise ValueError(f"{path}: column {column} holds no values")
    per_step = value(line, "batch_size")
    all_steps = [_float(row.get("step")) for row in rows]
    last_step = max((s for s in all_steps if s is not None), default=0)
    if per_step is None and value(line, "train_tokens") is not None and last_step > 0:
        per_step = value(line, "train_tokens") / last_step
    return [s for s, _ in points], [y for _, y in points], per_step


def _float(raw) -> float | None:
    try:
        number = float(raw)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def collect(lines: list[dict], notes: list[str]) -> dict:
    """{l0_target: [(line, steps, y, tokens per step)]} for the logs that read; failures are notes."""
    curves: dict = {}
    outside = [str(line.get("name")) for line in lines if is_outside(line)]
    if outside and any(metrics_csv(line) is not None for line in lines):
        notes.append(f"curves: {', '.join(outside)} not trained by this run: no training curve")
    for line in lines:
        if metrics_csv(line) is None:
            continue
        try:
            steps, y, per_step = read_curve(line)
        except ValueError as error:
            notes.append(f"curves: {line.get('name') or line['_source']}: {error}; left out")
            continue
        curves.setdefault(line.get("l0_target"), []).append((line, steps, y, per_step))
    return dict(sorted(curves.items(), key=lambda item: (item[0] is None, item[0] or 0)))


@styled
def plot_curves(curves: dict, title: str | None = None) -> Figure:
    """One panel per L0 target, one line per dictionary (seeds share their architecture's colour)."""
    # tokens when every log has a tokens-per-step figure, else steps for all (one x axis)
    tokens = all(per_step is not None for members in curves.values() for *_, per_step in members)
    n_rows = math.ceil(len(curves) / PANELS_PER_ROW)
    n_cols = min(len(curves), PANELS_PER_ROW)
    fig = Figure(figsize=(WIDTH_IN, 0.6 + 2.3 * n_rows), dpi=DPI, layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False, sharey=True).ravel()
    variants = sorted({line["_series"][1] for members in curves.values() for line, *_ in members})
    for ax, (target, members) in zip(axes, curves.items()):
        for line, steps, y, per_step in sorted(members, key=lambda m: series_order(m[0]["_series"])):
            style = series_style(line["_series"], variants)
            xs = [step * per_step / 1e6 for step in steps] if tokens else steps
            ax.plot(xs, y, color=style["color"], linestyle=style["linestyle"], linewidth=1.1, label=style["label"],
                    gid=f"curve:{line.get('name') or line['_source']}")
        ax.set_title(f"L0 target {target}" if target is not None else "no L0 target")
        log_y_axis(ax)
        ax.set_xlabel("training tokens (millions)" if tokens else "training steps")
    for ax in axes[len(curves):]:
        ax.set_visible(False)
    for row in range(n_rows):
        axes[row * n_cols].set_ylabel("validation FVU")
    share_x_label(fig, list(axes[: len(curves)]))
    legend_outside(fig, list(axes[: len(curves)]), above=True, title=title)
    return fig


def draw(lines: list[dict], out_dir: Path, notes: list[str], site: tuple[str, str] | None = None) -> list[Drawn]:
    if not any(metrics_csv(line) is not None for line in lines):
        notes.append(f"curves{site_suffix(site)}: no line has `log_dir`; training curves skipped")
        return []
    curves = collect(lines, notes)
    if not curves:
        return []
    stem = "curves" + site_suffix(site)
    caption = ("Validation FVU during training, one panel per L0 target; each line is one dictionary "
               "(seeds drawn separately).")
    return [Drawn(stem, caption, tuple(save(plot_curves(curves, site_title(site)), out_dir, stem)), site)]


if __name__ == "__main__":
    sys.exit(module_main(draw, __doc__.splitlines()[0]))
