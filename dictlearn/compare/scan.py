"""`dictlearn compare --l0 scan`: train across a range of L0 and say where the L0 diagnostic of
Chanin & Garriga-Alonso 2025 points (docs/compare.md, "Which L0?").

The scan is an ordinary comparison with more L0 targets (`SCAN_L0`, geometric) and, unless
`--architectures` says otherwise, TopK and BatchTopK only. After the results, `l0_scan.json` holds
one record per architecture (and width): the scanned targets, the seed means of the measured L0,
of `nth_decoder_projection` and of the sparse-probe AUCs at each, and the indicated L0 with its
interval over seeds (dictlearn/analysis/indicated_l0.py has the rule); `by_n`, the same reading at
n = d_sae/8, d_sae/4 and d_sae/2, `n_left_out`, those whose n is not above the L0 they point at,
and `n_agreement`, whether the others agree (where they do not, the reading is not confirmed
across n).
"""

from __future__ import annotations

import json
from pathlib import Path

from dictlearn.io import atomic_write_text

#: geometric, ratio ~√2, 4 ... 128 on a CPU (11 targets: 2 architectures x 3 seeds = 66 dictionaries,
#: about the default comparison's 63); ratio 2 up to 256 on a GPU
SCAN_L0 = {"cpu": (4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128), "cuda": (4, 8, 16, 32, 64, 128, 256)}
SCAN_ARCHITECTURES = ("topk", "batchtopk")


def write_l0_scan(out: Path, records: list[dict]) -> Path:
    """DIR/l0_scan.json: {"metric", "rule", "records": one per architecture and width}."""
    from dictlearn.analysis.indicated_l0 import PROXY, RULE, indicated  # the report's stage, no plotting

    path = Path(out) / "l0_scan.json"
    document = {"metric": PROXY, "rule": RULE, "records": indicated(records)}
    atomic_write_text(path, json.dumps(document, indent=1) + "\n")
    return path
