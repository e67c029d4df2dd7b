"""The `dictlearn` command: one small front-end module per subcommand, dispatched from here.

Only this module is imported for `dictlearn --help` and `--version`, so they answer without
loading torch or Lightning. A `DictLearnError` prints as one line (`--debug` shows the traceback)
and exits 2; a run stopped by SIGTERM/SIGINT exits 128 + signal.
"""

from __future__ import annotations

import importlib
import sys
import traceback

from dictlearn.cli.recipes import BASE_RECIPE, RECIPES_DIR, resolve_config
from dictlearn.errors import DictLearnError

LIGHTNING_COMMANDS = ("fit", "validate", "test")
# subcommand -> module whose `main(argv) -> int` runs it
COMMANDS = {
    **{name: "dictlearn.cli.lightning" for name in LIGHTNING_COMMANDS},
    "synth": "dictlearn.cli.synth",
    "export": "dictlearn.cli.export",
    "harvest": "dictlearn.cli.harvest",
    "evaluate": "dictlearn.cli.evaluate",
    "compare": "dictlearn.cli.compare",
    "analyse": "dictlearn.cli.analyse",
    "inspect": "dictlearn.cli.inspect",
    "steer": "dictlearn.cli.steer",
}

USAGE = """usage: dictlearn COMMAND [options]   (add --debug to any command for tracebacks)

  fit       train a dictionary, or a sweep of several:  dictlearn fit --config topk --data.path F.h5 --data.input_key acts
  validate  metrics on the held-out rows of a file for a checkpoint (--ckpt_path)
  test      same as validate, logged under test/
  synth     write synthetic activations with known features: dictlearn synth --out synth.h5
  export    checkpoint -> SAELens-layout export folder: dictlearn export CKPT OUT
  harvest   language-model activations -> HDF5: dictlearn harvest --out acts.h5 (embedded model, stdlib corpus)
  evaluate  export(s) + HDF5 (+ model) -> one JSON line per export: dictlearn evaluate EXPORT --data acts.h5
  compare   every architecture at matched L0, trained, evaluated, reported: dictlearn compare --out runs/cmp
  analyse   results file(s) -> figures and report: dictlearn analyse runs/a/results.jsonl runs/b/results.jsonl --out DIR
  inspect   feature dashboards, one HTML file: dictlearn inspect EXPORT --data acts.h5 --out topk.html
  steer     generate with one latent clamped: dictlearn steer EXPORT --feature 12 --scale 10 --prompt "def "

Recipes (--config NAME or a path): {recipes}.
`dictlearn fit --help` lists every option; `dictlearn --version` prints the version."""

__all__ = ["BASE_RECIPE", "RECIPES_DIR", "main", "resolve_config"]


def usage() -> str:
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if p.stem != "base")
    return USAGE.format(recipes=", ".join(names))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from dictlearn.version import dictlearn_version

        print(f"dictlearn {dictlearn_version()}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"dictlearn: error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[command])
        return module.main(argv if command in LIGHTNING_COMMANDS else argv[1:])
    except DictLearnError as error:
        if debug:
            traceback.print_exc()
        print(f"dictlearn: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C before a run installs its own handler (torch and Lightning take seconds to
        # import): 128 + SIGINT, as a shell reports a process stopped by it, and no traceback.
        if debug:
            traceback.print_exc()
        print(f"dictlearn: interrupted; {command} did not finish", file=sys.stderr)
        return 130
