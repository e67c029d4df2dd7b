"""The scan's reading at n = d_sae/8, /4, /2 on the synthetic ground truth of
tests/test_l0_ground_truth.py (true mean L0 6 and 16, its k grid, seeds 0, 1, 2, 1,000 steps):
the rule of `dictlearn compare --l0 scan` (analysis/indicated_l0.indicated) per true L0, and
whether the three readings agree (docs/metrics.md, "At three n"); per seed, the indicated L0 at
each n and the measured L0 of the lowest held-out FVU ("pick the best FVU"). JumpReLU is trained
towards an L0 of each k by compare's controller (the test's `train`); the rule reads the measured
L0, printed per target. ~1-4 s of CPU per dictionary, 42 dictionaries per architecture. Run from
the repository root:
    .venv/bin/python benchmarks/l0_three_n_ground_truth.py batchtopk [lines.json]   (or topk, jumprelu)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_l0_ground_truth import GRID, WIDTHS, orthogonal_rows, train  # noqa: E402

from dictlearn.analysis.indicated_l0 import PROXY_BY_N, indicated, minimum  # noqa: E402
from dictlearn.metrics.decoder_projection import NthDecoderProjection  # noqa: E402


def measure(model, held: torch.Tensor) -> dict:
    """held: [rows, d] -> the measured L0, the FVU and every proxy key on the held-out rows."""
    with torch.no_grad():
        z = model.encode(held)
        fvu = float((held - model.decode(z)).square().sum() / (held - held.mean(0)).square().sum())
        proxy = NthDecoderProjection(model.W_dec)
        proxy.update(held - model.decode(torch.zeros_like(z)))
    return {"l0": float((z != 0).float().sum(1).mean()), "fvu": fvu, **proxy.compute()}


def per_seed(lines: list[dict]) -> list[str]:
    """One line per seed: the measured L0 per target, the indicated L0 at each n (↑: lowest at the
    largest target, ↓: at the smallest) and the measured L0 of the best FVU."""
    out = []
    for seed in sorted({line["seed"] for line in lines}):
        own = sorted((line for line in lines if line["seed"] == seed), key=lambda line: line["l0_target"])
        l0 = [line["l0"] for line in own]
        readings = []
        for label, _, key in PROXY_BY_N:
            value, edge = minimum(l0, [line[key] for line in own])
            readings.append(f"{label} {value:.3g}" if value is not None else f"{label} {'↑' if edge == 'largest' else '↓'}")
        best = min(own, key=lambda line: line["fvu"])["l0"]
        out.append(f"seed {seed}: L0 {[round(v, 2) for v in l0]}; {', '.join(readings)}; best-FVU L0 {best:.3g}")
    return out


def summary(lines: list[dict], group) -> None:
    """Print the scan's records (its rule over the seed means) and the per-seed readings."""
    for record in indicated(lines, group=group):
        readings = [(r["n_of_d_sae"], r["n"], r["indicated_l0"], r["interval"], r["proxy_lowest_at"])
                    for r in record["by_n"]]
        print(f"{record['architecture']}, {record['group']}: {record['n_agreement']}; {readings}")
        for text in per_seed([line for line in lines if group(line) == tuple(record["group"])]):
            print("  " + text)


def main(architecture: str) -> None:
    torch.set_num_threads(1)  # as the test: [256, 64] matrices gain nothing from a second thread
    lines = []
    for true_l0 in (6, 16):
        for seed in (0, 1, 2):
            rows = orthogonal_rows(true_l0, seed)
            data, held = rows[:60_000], rows[60_000:]
            for k in GRID[true_l0]:
                model = train(architecture, k, data, WIDTHS[true_l0]["n_features"], seed)
                lines.append({"architecture": architecture, "d_sae": model.d_sae, "true_l0": true_l0, "l0_target": k,
                              "seed": seed, **measure(model, held)})
                print(json.dumps(lines[-1]), flush=True)
    if len(sys.argv) > 2:  # the results lines, to read them again without training
        Path(sys.argv[2]).write_text(json.dumps(lines) + "\n")
    summary(lines, group=lambda line: (line["architecture"], line["true_l0"]))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "batchtopk")
