"""`dictlearn compare`: every architecture at matched sparsity on the same activations (docs/compare.md).

Flags override `--config FILE.yaml`, whose keys are `CompareConfig`'s fields; both are optional.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from dictlearn.cli.parsing import OneLineParser, path_text
from dictlearn.compare.plan import DEFAULT_ARCHITECTURES, CompareConfig


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None


def _targets(text: str) -> list[int] | str:
    if text.strip() == "scan":
        return "scan"
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas or 'scan', got {text!r}") from None


def _count(text: str) -> int:
    try:
        return int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number (400000 or 4e5), got {text!r}") from None


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas (3e-4,1e-3), got {text!r}") from None


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="dictlearn compare", description=(
        "Harvest one layer, train every architecture at matched L0 targets and several seeds in one "
        "sweep per seed, evaluate them (downstream loss included) and write results and a report into --out."))
    add = p.add_argument
    add("--out", type=path_text, default=None, help="run folder (default: compare_run); rerun with the same --out to resume")
    add("--config", type=path_text, default=None, help="YAML file of these options (e.g. a run's compare.yaml); flags override it")
    add("--model", type=path_text, default=None, help="model to harvest (HF name or folder; default: the embedded model)")
    add("--corpus", type=path_text, default=None, help="text file or folder (default: the Python standard library)")
    add("--layer", type=int, default=None, help="block to harvest (default: the middle one)")
    add("--tokens", type=_count, default=None, help="tokens to harvest (default: 250000 on CPU)")
    add("--context", type=int, default=None, help="harvest window length (default: 256)")
    add("--data", type=path_text, default=None, help="train on this HDF5 file instead of harvesting")
    add("--input-key", default=None, help="--data: the input dataset")
    add("--target-key", default=None, help="--data: the dataset transcoders predict")
    add("--architectures", type=_names, default=None,
        help=f"comma-separated (default: {','.join(DEFAULT_ARCHITECTURES)})")
    add("--l0", type=_targets, default=None, help="L0 targets (default: 8,16,32 on CPU, 8,16,32,64 on a GPU), or "
        "'scan': 4..128 (CPU) geometric for topk,batchtopk and DIR/l0_scan.json, the L0 the decoders point to")
    add("--d-sae", type=_ints, default=None, help="dictionary width(s) (default: 512 on CPU)")
    add("--seeds", type=_ints, default=None, help="seeds, each setting the initial weights and the data order (default: 0,1,2)")
    add("--train-tokens", type=_count, default=None, help="training tokens per dictionary (default: 400000 on CPU)")
    add("--batch-size", type=int, default=None, help="tokens per step (default: 1024 on CPU)")
    add("--tune-lr", action="store_true", default=None,
        help="choose each architecture's learning rate on validation documents first (docs/compare.md)")
    add("--lr-grid", type=_floats, default=None, help="--tune-lr's learning rates (default: the common LR x 1/3, 1, 3)")
    add("--include", type=_names, default=None,
        help="dictionaries trained elsewhere (SAELens, sparsify, dictionary_learning folders or dictlearn exports), "
             "PATH or NAME=PATH, comma-separated: evaluated and drawn beside the run's, not trained")
    add("--replace", default=None, choices=["mlp"],
        help="mlp: replace every MLP at once and compare per-layer transcoders, skip transcoders and cross-layer "
             "transcoders at matched total L0 (--l0 is then the total over layers; docs/compare.md)")
    add("--contexts", type=int, default=None, help="held-out corpus windows for the downstream metrics")
    add("--device", default=None, help="cpu, cuda, cuda:1 or auto (default: auto)")
    add("--devices", type=int, default=None, help="processes/GPUs for DDP training (default: 1)")
    add("--workers", type=int, default=None,
        help="processes training the seeds' sweeps and evaluating side by side (default: one per seed on a CPU, "
             "at most two per core; 1 on a GPU)")
    add("--no-downstream", dest="downstream", action="store_false", default=None,
        help="skip the spliced-model metrics")
    add("--no-interpret", dest="interpret", action="store_false", default=None,
        help="skip the concept probes, coverage and dashboards")
    add("--quiet", action="store_true", default=None, help="no progress display")
    return p


def config_from_args(argv: list[str]) -> CompareConfig:
    args = vars(build_parser().parse_args(argv))
    values = CompareConfig.from_yaml(args.pop("config")) if args.get("config") else {}
    values |= {k: v for k, v in args.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(CompareConfig)}
    return CompareConfig(**{k: v for k, v in values.items() if k in fields})


def main(argv: list[str]) -> int:
    config = config_from_args(argv)  # --help and usage errors answer before the training stack loads
    from dictlearn.compare.main import compare
    from dictlearn.compare.run import Stopped, _rank

    try:
        out = compare(config)
    except Stopped as stop:
        print(f"dictlearn: compare {stop}", file=sys.stderr)
        return stop.code
    except KeyboardInterrupt:
        print("dictlearn: compare stopped; rerun the same command to resume (exit 130)", file=sys.stderr)
        return 130
    finally:
        from dictlearn.compare.run import _leave_process_group

        _leave_process_group(barrier=False)  # after DDP, or the interpreter may abort at exit
    if not config.quiet and _rank() == 0:
        print(f"dictlearn: comparison written to {out} (report: {out / 'report.md'})")
    return 0
