"""compare's default comparison (7 architectures x 3 L0 targets) on the activations a default run
harvested, with the short run's settings overridden (benchmarks/RESULTS.md, "Short-run defaults").

    python benchmarks/short_run_defaults.py RUN/activations.h5 '{"out": "/tmp/sr/old", "seeds": [0, 1],
        "lr": 1e-3, "lr_decay_fraction": 0.3, "init_scale_from_data": true, "block_size": 512}'
    python benchmarks/short_run_defaults.py RUN/activations.h5 '{"out": "/tmp/sr/new", "train_tokens": 204800}'

Keys: out, seeds, train_tokens, architectures, l0 (as compare's), lr and lr_decay_fraction (its
`optimizer:`), init_scale_from_data (every mechanism's), block_size (the sweeps' data blocks); a key
left out keeps compare's default. Downstream metrics and dashboards are skipped: results.jsonl holds
held-out FVU and L0. One thread (SR_THREADS to change), so it can run beside other work.
"""
import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(int(os.environ.get("SR_THREADS", "1")))
from dictlearn.compare import run as compare_run
from dictlearn.compare import sweeps
from dictlearn.compare.plan import DEFAULT_ARCHITECTURES, CompareConfig, parse_architecture

H5, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
block = overrides.pop("block_size", None)
default_sweep_data = sweeps.sweep_data


def sweep_data(config, source, seed):
    data = default_sweep_data(config, source, seed)
    if block is None:
        return data
    from dictlearn.data import ActivationDataModule

    return ActivationDataModule(**{**dict(data.hparams), "block_size": block})


sweeps.sweep_data = sweep_data  # what `sweeps._fit` calls (in this process: workers=1 below)
# the harvested file's keys as compare's harvest names them (embedded model, middle block 2)
compare_run.check_source = lambda config, out: (compare_run.Source(
    H5, ("transformer.h.2", None), ("transformer.h.2.mlp:input", "transformer.h.2.mlp"), None), None)
optimizer = {k: overrides.pop(k) for k in ("lr", "lr_decay_fraction") if k in overrides}
dictionary = {}
if "init_scale_from_data" in overrides:
    scale = overrides.pop("init_scale_from_data")
    for architecture in DEFAULT_ARCHITECTURES:
        dictionary.setdefault(parse_architecture(architecture)[0], {})["init_scale_from_data"] = scale
config = CompareConfig(out=overrides.pop("out"), seeds=overrides.pop("seeds", [0, 1]),
                       train_tokens=overrides.pop("train_tokens", None), architectures=overrides.pop("architectures", None),
                       l0=overrides.pop("l0", None), optimizer=optimizer, dictionary=dictionary, downstream=False,
                       interpret=False, quiet=True, device="cpu", workers=1)
if overrides:
    sys.exit(f"unknown keys {sorted(overrides)}")
compare_run.compare(config)
