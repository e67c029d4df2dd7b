"""The table of docs/outside.md: for every committed peer fixture (tests/fixtures/peers/), the max
relative difference max |dictlearn − library| / max |library| of the latents and of the output
(decode(encode(x)) and forward(x)) on the library's own reference input.

    .venv/bin/python benchmarks/outside_table.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

import dictlearn

PEERS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "peers"


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def main() -> None:
    print("| format | fixture | dictlearn class | latents | output |\n|---|---|---|---|---|")
    for reference in sorted(PEERS.rglob("*.reference.safetensors")):
        name = reference.name[: -len(".reference.safetensors")]
        folder, keywords = reference.with_name(name), {}
        if name.startswith("run_"):  # one hookpoint of a sparsify run folder
            folder, keywords = reference.parent / "run", {"hookpoint": name[len("run_"):]}
        r = load_file(str(reference))
        dictionary = dictlearn.load(folder, **keywords)
        with torch.no_grad():
            z = dictionary.encode(r["x"])
            output = max(relative(dictionary.decode(z, r["x"]), r["y"]), relative(dictionary(r["x"]), r["y"]))
        print(f"| {reference.parent.name} | {name} | `{type(dictionary).__name__}` | {relative(z, r['z']):.1e} "
              f"| {output:.1e} |")


if __name__ == "__main__":
    main()
