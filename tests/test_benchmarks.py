"""The hand-run benchmarks still run (their numbers are judged by the person running them; here only
that nothing broke): `benchmarks/throughput.py --smoke` on a small shape. Its sparse-path counter
once read a model attribute that a refactor removed, and nothing noticed until a full run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_throughput_smoke_runs_and_counts_the_sparse_steps(tmp_path):
    command = [sys.executable, str(BENCHMARKS / "throughput.py"), "--smoke", "--peers", "none", "--architectures",
               "topk", "--d-in", "64", "--d-sae", "512", "--k", "8", "--batch", "256", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("topk ")}
    # k / d_sae = 1.6 % at d_sae 512: every automatic step is sparse, every "never" step dense
    assert " 100% " in rows["auto"] and " 0% " in rows["never"], result.stdout
