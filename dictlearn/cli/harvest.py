"""`dictlearn harvest`: the command line of `dictlearn.harvest.harvest` (flags, SIGTERM, summary).

    dictlearn harvest --out acts.h5        # embedded model, stdlib corpus, middle layer's standard hooks

Usage errors are one-line ConfigErrors (the dispatcher prints them, exit 2). SIGTERM and Ctrl-C
leave nothing at --out and exit 128 + the signal number.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from dictlearn.cli.parsing import OneLineParser, count_or_all, layer_list, path_text, positive_int
from dictlearn.io import check_writable_file
from dictlearn.runtime import check_device
from dictlearn.errors import ConfigError
from dictlearn.models.tiny import DEFAULT_CONTEXT

# The library's defaults (dictlearn.harvest.activations, dictlearn.models.corpus), repeated so that
# `dictlearn harvest --help` does not import torch; tests/test_cli_errors_commands.py checks they agree.
DEFAULT_TOKENS, DEFAULT_BATCH_SIZE = 400_000, 16
WINDOWS_PER_DOCUMENT = 2  # dictlearn.harvest.plan's; repeated so --help needs no torch (a test checks they agree)
DTYPES = ("float32", "float16", "bfloat16")
SPLITS = ("train", "heldout", "all")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="dictlearn harvest", description="Language-model activations at named hooks -> one HDF5 file.")
    p.add_argument("--out", type=path_text, required=True, help="HDF5 file to write (atomically)")
    p.add_argument("--model", default=None, help="model name in the local HF cache, or a folder (default: embedded)")
    p.add_argument("--corpus", default=None, help="text file or folder (default: the Python standard library)")
    p.add_argument("--split", default="train", choices=SPLITS, help="corpus files to use (default: train)")
    p.add_argument("--hooks", default=None,
                   help="comma-separated hook names (default: residual stream, MLP input and output of --layer)")
    p.add_argument("--layer", type=int, default=None, help="block of the default hooks (default: the middle one)")
    p.add_argument("--layers", type=layer_list, default=None,
                   help="'all' or L1,L2,... in increasing order: every listed block's default hooks, row-aligned in "
                        "one file (for cross-layer transcoders and replacement models)")
    p.add_argument("--tokens", type=count_or_all, default=DEFAULT_TOKENS,
                   help=f"rows (tokens) to write, or 'all' (default: {DEFAULT_TOKENS}, about a minute on 2 CPUs)")
    p.add_argument("--context", type=int, default=None,
                   help=f"window length in tokens (default: {DEFAULT_CONTEXT}, or the model's maximum if shorter)")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="windows per forward pass")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="stored dtype (bfloat16: uint16 bits)")
    special = p.add_mutually_exclusive_group()
    special.add_argument("--exclude-special", dest="exclude_special", action="store_true", default=True,
                         help="drop BOS positions (default)")
    special.add_argument("--keep-special", dest="exclude_special", action="store_false", help="keep BOS positions")
    p.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda, cuda:1, ...)")
    p.add_argument("--seed", type=int, default=0,
                   help="orders the documents, places each excerpt and picks the held-out documents (every 10th)")
    p.add_argument("--windows-per-document", type=positive_int, default=WINDOWS_PER_DOCUMENT,
                   help=f"windows of --context tokens taken from each document, at most (default: {WINDOWS_PER_DOCUMENT}; doubled when "
                        "the corpus is too small for --tokens)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-concepts", dest="concepts", action="store_false", default=None,
                   help="skip the concepts/ labels (default: written when the corpus holds Python files)")
    return p


def _on_sigterm(handler):
    """Install a SIGTERM handler; -> the previous one (None off the main thread, where it cannot be set)."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.hooks is not None and args.layer is not None:
        raise ConfigError("--layer picks the default hooks; drop it or drop --hooks")
    if args.layers is not None and (args.hooks is not None or args.layer is not None):
        raise ConfigError(f"--layers picks the hooks of several layers; drop {'--hooks' if args.hooks else '--layer'}"
                          " or drop --layers")
    check_writable_file(args.out, "--out", example="acts.h5")  # before loading the model
    check_device(args.device)
    import h5py

    from dictlearn.harvest.activations import _Terminated, default_hooks, harvest, layer_hooks, max_positions
    from dictlearn.models.loading import load_model

    lm = load_model(args.model, device=args.device)  # quiet: no transformers progress bar
    if args.hooks is not None:
        hooks = [h.strip() for h in args.hooks.split(",") if h.strip()]
    elif args.layers is not None:
        hooks = layer_hooks(lm.model, args.layers)
    else:
        hooks = default_hooks(lm.model, args.layer)
    context = args.context
    if context is None:
        context = min(DEFAULT_CONTEXT, max_positions(lm.model) or DEFAULT_CONTEXT)
    # The handler only sets a flag that the batch loop reads: an exception raised inside a signal
    # handler is lost when the signal lands in a __del__ or a finally block, and the harvest ran on.
    terminated = threading.Event()
    previous = _on_sigterm(lambda signum, frame: terminated.set())
    start = time.perf_counter()
    try:
        path = harvest(lm, hooks, args.out, args.tokens, context, corpus=args.corpus, split=args.split,
                       batch_size=args.batch_size, dtype=args.dtype, exclude_special=args.exclude_special,
                       device=args.device, progress=not args.quiet, seed=args.seed,
                       should_stop=terminated.is_set, concepts=args.concepts,
                       windows_per_document=args.windows_per_document)
    except (KeyboardInterrupt, _Terminated) as stop:
        code = 128 + (signal.SIGINT if isinstance(stop, KeyboardInterrupt) else signal.SIGTERM)
        print(f"dictlearn: harvest interrupted; nothing written at {args.out}", file=sys.stderr)
        return code
    finally:
        _on_sigterm(previous)
    seconds = time.perf_counter() - start
    with h5py.File(path, "r") as f:
        rows = int(f.attrs["tokens"])
        widths = ", ".join(f"{h} [{f[h].shape[1]}]" for h in hooks)
    print(f"dictlearn: wrote {rows} rows x {len(hooks)} hooks ({widths}) to {path} in {seconds:.1f} s"
          f" ({rows / seconds:,.0f} tokens/s)")
    return 0
