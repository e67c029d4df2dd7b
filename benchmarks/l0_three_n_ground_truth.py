"""The scan's reading at n = d_sae/8, /4, /2 on the synthetic ground truth of
tests/test_l0_ground_truth.py (true mean L0 6 and 16, its k grid, seeds 0, 1, 2, 1,000 steps):
the rule of `dictlearn compare --l0 scan` (analysis/indicated_l0.indicated) per true L0, and
whether the three readings agree (docs/metrics.md, "At three n"). ~2-4 s of CPU per dictionary,
42 dictionaries per architecture. Run from the repository root:
    .venv/bin/python benchmarks/l0_three_n_ground_truth.py batchtopk [lines.json]   (or topk)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_l0_ground_truth import GRID, WIDTHS, orthogonal_rows, train  # noqa: E402

from dictlearn.analysis.indicated_l0 import indicated  # noqa: E402
from dictlearn.metrics.decoder_projection import NthDecoderProjection  # noqa: E402


def main(architecture: str) -> None:
    torch.set_num_threads(1)  # as the test: [256, 64] matrices gain nothing from a second thread
    lines = []
    for true_l0 in (6, 16):
        for seed in (0, 1, 2):
            rows = orthogonal_rows(true_l0, seed)
            data, held = rows[:60_000], rows[60_000:]
            for k in GRID[true_l0]:
                model = train(architecture, k, data, WIDTHS[true_l0]["n_features"], seed)
                with torch.no_grad():
                    z = model.encode(held)
                    proxy = NthDecoderProjection(model.W_dec)
                    proxy.update(held - model.decode(torch.zeros_like(z)))
                lines.append({"architecture": architecture, "d_sae": model.d_sae, "true_l0": true_l0, "l0_target": k,
                              "seed": seed, "l0": float((z != 0).float().sum(1).mean()), **proxy.compute()})
    if len(sys.argv) > 2:  # the results lines, to read them again without training
        Path(sys.argv[2]).write_text(json.dumps(lines) + "\n")
    for record in indicated(lines, group=lambda line: (line["true_l0"],)):
        readings = [(r["n_of_d_sae"], r["n"], r["indicated_l0"], r["interval"], r["proxy_lowest_at"])
                    for r in record["by_n"]]
        print(f"{architecture}, true L0 {record['group'][0]}: {record['n_agreement']}; {readings}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "batchtopk")
