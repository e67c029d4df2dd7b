"""Harvesting, the first stage: a language model + a corpus + hook names -> one HDF5 activation file.

    from dictlearn.harvest import default_hooks, harvest
    from dictlearn.models.loading import load_model
    lm = load_model(None)                                   # the embedded model
    harvest(lm, default_hooks(lm.model), "acts.h5", tokens=200_000, context=256)

`activations` holds the library (planning, writing, `harvest`), `cli` the `dictlearn harvest`
command. The file layout is in docs/data.md ("Harvested files").
"""

from dictlearn.harvest.activations import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_TOKENS,
    DTYPES,
    check_hooks,
    default_hooks,
    harvest,
    max_positions,
    n_layers,
    plan_windows,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_TOKENS",
    "DTYPES",
    "check_hooks",
    "default_hooks",
    "harvest",
    "max_positions",
    "n_layers",
    "plan_windows",
]
