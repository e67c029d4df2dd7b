"""What `dictlearn compare` writes at the end: results lines (evaluate's record + the plan's
keys), `results.jsonl`/`results.csv`, and `timings.json` with the machine it ran on."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

from dictlearn.compare.plan import OPTIMIZER, CompareConfig, Planned, plan
from dictlearn.dictionaries.registry import mechanism_class
from dictlearn.io import atomic_write_text


def results_line(config: CompareConfig, p: Planned, out: Path) -> dict:
    """evaluate's record + what the comparison knows about the dictionary (DESIGN.md's keys)."""
    record = json.loads((out / "evaluations" / f"{p.name}.json").read_text())
    hyper = record.get("hyper_parameters") or {}
    coefficient = mechanism_class(p.mechanism).mechanism.coefficient  # None: k sets L0
    seconds_file = out / "train" / f"seed{p.seed}" / "train_seconds.json"
    group = [q for q in plan(config) if q.seed == p.seed]
    seconds = json.loads(seconds_file.read_text())["seconds"] / len(group) if seconds_file.is_file() else None
    line = {
        **record,
        "name": p.name, "architecture": p.architecture, "mechanism": p.mechanism, "mapping": p.mapping,
        "l0_target": p.l0_target, "d_sae": p.d_sae, "seed": p.seed,
        "k": hyper.get("k") if coefficient is None else None,
        "train_tokens": config.steps * config.batch_size * config.devices, "train_seconds": seconds,
        "export": str((out / "exports" / p.name).resolve()),
        "log_dir": str(Path("train") / f"seed{p.seed}" / "version_0"), "member": p.name,
        "batch_size": config.batch_size,
        "trained": True,  # an included dictionary's line says false (include.py's `included_line`)
    }  # fmt: skip
    # what it trained with (the same for every architecture unless a search or an override chose otherwise)
    line["optimizer"] = {key: p.training[key] for key in OPTIMIZER if key in p.training}
    line["lr_tuned"] = bool(config.tune_lr)  # the LR chosen on validation documents (compare/tune.py)
    if coefficient is not None and coefficient in hyper:  # the calibrated λ
        line[coefficient] = hyper[coefficient]
    return line


def write_results(out: Path, records: list[dict]) -> None:
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in records))
    columns = [k for k in dict.fromkeys(k for r in records for k in r) if k != "feature_density"]  # 1 number a latent
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in records:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})
    atomic_write_text(out / "results.csv", buffer.getvalue())


def write_timings(out: Path, progress, total: float, host: dict, complete: bool = True) -> None:
    """DIR/timings.json: `progress`'s seconds per stage of this invocation and the machine it ran
    on (`machine()`, measured once per invocation: the report and the file show the same rate).
    `complete` False: written for the report, before the report stage ends (the report leaves
    that stage out and calls the total what it is); the run writes the file again at its end."""
    stages = {k: round(v, 1) for k, v in progress.seconds.items()}
    atomic_write_text(out / "timings.json", json.dumps(
        {"stages": stages | {"total": round(total, 1)}, "machine": host, "complete": complete}, indent=2))


def machine(device: str) -> dict:
    """CPU model, cores, load, a measured fp32 matmul rate (and the GPU, if one is used)."""
    import platform

    import torch

    info = {"cpu": _cpu_model() or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average_1m": round(os.getloadavg()[0], 2),
            "fp32_matmul_gflops": round(matmul_gflops(), 1), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """fp32 n×n matmul rate on the CPU, best of `repeats`."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
