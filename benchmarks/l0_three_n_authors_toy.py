"""The scan's reading at n = d_sae/8, /4, /2 on the authors' toy data (Chanin & Garriga-Alonso's
reference code: 50 orthogonal features in d = 100, true mean L0 10.95, firing correlated across
70 % of the feature pairs; tests/test_l0_ground_truth.py `authors_rows`), d_sae = 50, k on
`AUTHORS_GRID`, seeds 0, 1, 2, 1,000 steps of 256 rows (the test's `train`): the rule of
`dictlearn compare --l0 scan` (analysis/indicated_l0.indicated) and its three-n verdict
(docs/metrics.md, "At three n"); each line also holds the proxy at n = 16 and 19 (`s_n16`,
`s_n19`, 5/16 and 3/8 of d_sae), which the rule does not read; per seed, the indicated L0 at each
n and the measured L0 of the best held-out FVU. JumpReLU is trained towards an L0 of each k by
compare's controller (the test's `train`); the rule reads the measured L0. ~1-4 s of CPU per
dictionary, 21 per architecture. Run from the repository root:
    .venv/bin/python benchmarks/l0_three_n_authors_toy.py batchtopk [lines.json [steps]]   (or topk, jumprelu)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_l0_ground_truth  # noqa: E402
from test_l0_ground_truth import AUTHORS, AUTHORS_GRID, authors_rows, train  # noqa: E402

from l0_three_n_ground_truth import measure, summary  # noqa: E402

from dictlearn.metrics.decoder_projection import NthDecoderProjection  # noqa: E402


def main(architecture: str) -> None:
    if len(sys.argv) > 3:  # longer training: the test's STEPS replaced
        test_l0_ground_truth.STEPS = int(sys.argv[3])
    torch.set_num_threads(1)  # as the test: small matrices gain nothing from a second thread
    lines = []
    for seed in (0, 1, 2):
        rows = authors_rows(seed)
        data, held = rows[:60_000], rows[60_000:]
        for k in AUTHORS_GRID:
            model = train(architecture, k, data, AUTHORS["n_features"], seed)
            with torch.no_grad():
                # n between d_sae/4 and d_sae/2 (5/16, 3/8 of d_sae), for docs/metrics.md; not read by the rule
                between, written = {}, held - model.decode(torch.zeros(len(held), model.d_sae))
                for n in (16, 19):
                    extra = NthDecoderProjection(model.W_dec, n=n)
                    extra.update(written)
                    between[f"s_n{n}"] = extra.compute()["nth_decoder_projection"]
            lines.append({"architecture": architecture, "d_sae": model.d_sae, "l0_target": k, "seed": seed,
                          **measure(model, held), **between})
            print(json.dumps(lines[-1]), flush=True)
    if len(sys.argv) > 2:  # the results lines, to read them again without training
        Path(sys.argv[2]).write_text(json.dumps(lines) + "\n")
    summary(lines, group=lambda line: (line["architecture"],))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "batchtopk")
