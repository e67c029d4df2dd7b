"""Harvesting, the first stage: a language model + a corpus + hook names -> one HDF5 activation file.

    from dictlearn.harvest import default_hooks, harvest
    from dictlearn.models.loading import load_model
    lm = load_model(None)                                   # the embedded model
    harvest(lm, default_hooks(lm.model), "acts.h5", tokens=200_000, context=256)

`plan` chooses the text (documents in a seeded order, a capped excerpt of each, held-out
documents), `activations` runs the model and writes the file (`harvest`), `dictlearn.cli.harvest`
is the `dictlearn harvest` command. The file layout is in docs/data.md ("Harvested files").
"""

from dictlearn.harvest.activations import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_TOKENS,
    DTYPES,
    check_hooks,
    default_hooks,
    harvest,
    layer_hooks,
    max_positions,
    n_layers,
)
from dictlearn.harvest.plan import HELDOUT_EVERY, WINDOWS_PER_DOCUMENT, plan_harvest

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_TOKENS",
    "DTYPES",
    "HELDOUT_EVERY",
    "WINDOWS_PER_DOCUMENT",
    "check_hooks",
    "default_hooks",
    "harvest",
    "layer_hooks",
    "max_positions",
    "n_layers",
    "plan_harvest",
]
