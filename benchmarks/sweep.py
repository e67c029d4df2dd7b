"""Sweep efficiency: one `dictlearn fit` of a 12-member sweep against 12 solo `dictlearn fit` runs.

The members: TopK, BatchTopK, ReLU-L1, gated, JumpReLU and a TopK transcoder, each at two
sparsities, d_sae 2048, on 128-wide activations (the embedded model's width), batch 1024. Every
run goes through the command line, start-up, data-dependent initialisation, validation and
export included, as a user pays them. Per-step times come from the difference of two runs of
different lengths (`--steps` and `--steps * 2`), so start-up cancels out.

    python benchmarks/sweep.py                 # writes a synthetic 128-wide file, ~10 min on 2 cores
    python benchmarks/sweep.py --steps 50      # quicker, noisier

Measure on a quiet machine only (`uptime`): another CPU-bound process on 2 cores makes every
number meaningless (OpenMP threads wait on each other).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

D, D_SAE, BATCH = 128, 2048, 1024
MEMBERS = {
    "topk_k16": ("dictlearn.TopKSAE", {"k": 16}),
    "topk_k32": ("dictlearn.TopKSAE", {"k": 32}),
    "batchtopk_k16": ("dictlearn.BatchTopKSAE", {"k": 16}),
    "batchtopk_k32": ("dictlearn.BatchTopKSAE", {"k": 32}),
    "relu_l1_a": ("dictlearn.ReLUL1SAE", {"l1_coefficient": 5.0}),
    "relu_l1_b": ("dictlearn.ReLUL1SAE", {"l1_coefficient": 10.0}),
    "gated_a": ("dictlearn.GatedSAE", {"l1_coefficient": 1.0}),
    "gated_b": ("dictlearn.GatedSAE", {"l1_coefficient": 2.0}),
    "jumprelu_a": ("dictlearn.JumpReLUSAE", {"l0_coefficient": 1.0}),
    "jumprelu_b": ("dictlearn.JumpReLUSAE", {"l0_coefficient": 2.0}),
    "topk_transcoder_k16": ("dictlearn.TopKSAE", {"k": 16, "transcoder": True}),
    "topk_transcoder_k32": ("dictlearn.TopKSAE", {"k": 32, "transcoder": True}),
}


def member_entry(class_path: str, args: dict) -> dict:
    entry = {"dictionary": {"class_path": class_path, "init_args": {"d_sae": D_SAE, **args}}}
    if args.get("transcoder"):
        entry["target_key"] = "target"
    return entry


def fit(config: dict, data: Path, steps: int, folder: Path) -> float:
    """Wall seconds of one `dictlearn fit` of `config` for `steps` steps."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [
        sys.executable, "-m", "dictlearn.cli", "fit", "--config", str(path), "--data.path", str(data),
        "--data.input_key", "acts", "--data.batch_size", str(BATCH), "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps), "--trainer.log_every_n_steps", "50",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(folder / "runs"),
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"fit failed ({folder.name}):\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="steps of the short runs; the long ones run twice as many")
    parser.add_argument("--data", type=Path, default=None, help="an HDF5 file with 'acts' and 'target' [rows, 128]")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dictlearn_sweep_bench_"))
    data = args.data or work / "acts.h5"
    if args.data is None:
        subprocess.run([sys.executable, "-m", "dictlearn.cli", "synth", "--out", str(data), "--rows", "400000",
                        "--d", str(D), "--features", "1024", "--mean-active", "8", "--d-out", str(D)], check=True,
                       capture_output=True)  # fmt: skip
    short, long = args.steps, 2 * args.steps
    sweep = {"sweep": {name: member_entry(*spec) for name, spec in MEMBERS.items()}}
    timings = {"sweep": [fit(sweep, data, n, work / f"sweep_{n}") for n in (short, long)]}
    for name, (class_path, member_args) in MEMBERS.items():
        solo = {"model": {"class_path": class_path, "init_args": {"d_sae": D_SAE, **member_args}}}
        if member_args.get("transcoder"):
            solo["data"] = {"target_key": "target"}
        timings[name] = [fit(solo, data, n, work / f"{name}_{n}") for n in (short, long)]

    solo_total = sum(t[1] for name, t in timings.items() if name != "sweep")
    sweep_total = timings["sweep"][1]
    per_step = {name: (t[1] - t[0]) / (long - short) for name, t in timings.items()}
    solo_step = sum(v for name, v in per_step.items() if name != "sweep")
    print(f"machine: {platform.processor() or platform.machine()}, {long} steps, batch {BATCH}, d {D}, d_sae {D_SAE}")
    print(f"12 solo runs: {solo_total:.1f} s; one sweep: {sweep_total:.1f} s; sweep is {solo_total / sweep_total:.2f}x faster")
    print(f"step time: sweep {1e3 * per_step['sweep']:.1f} ms = {1e3 * per_step['sweep'] / len(MEMBERS):.1f} ms per member; "
          f"solo steps summed {1e3 * solo_step:.1f} ms ({solo_step / per_step['sweep']:.2f}x the sweep's)")
    print(f"fixed cost (start-up, init, validation, export): sweep {timings['sweep'][0] - short * per_step['sweep']:.1f} s, "
          f"solo runs {sum(t[0] - short * per_step[n] for n, t in timings.items() if n != 'sweep'):.1f} s")
    for name in MEMBERS:
        print(f"  {name:<22} solo step {1e3 * per_step[name]:6.1f} ms, run {timings[name][1]:5.1f} s")


if __name__ == "__main__":
    main()
