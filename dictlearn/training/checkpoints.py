"""What a training checkpoint records beyond Lightning's state, and reading older ones.

`save_members` writes each member's class, constructor arguments, training settings and data
provenance (`dictlearn_members`, what `dictlearn.export.load` rebuilds a member from);
`check_and_upgrade` refuses a checkpoint of other members or sizes in one line and moves the
state of older layouts (one dictionary before sweeps; dead-latent counters inside the model) to
today's.
"""

from __future__ import annotations

from dataclasses import asdict

from dictlearn.errors import DataError


def save_members(module, checkpoint: dict) -> None:
    """`checkpoint["dictlearn_members"]` (and `dictlearn_data` for one dictionary) from the
    `DictionaryTraining` `module`."""
    datamodule = module._trainer.datamodule if module._trainer is not None else None
    checkpoint["dictlearn_members"] = {name: _member_record(module, name, datamodule) for name in module.members}
    if len(module.members) == 1 and datamodule is not None:  # where the data came from, for the export
        checkpoint["dictlearn_data"] = checkpoint["dictlearn_members"][next(iter(module.members))]["data"]


def _member_record(module, name: str, datamodule) -> dict:
    member = module.members[name]
    cls = type(member)
    record = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "hyper_parameters": dict(member.hparams),
              "training": asdict(module.settings[name])}
    if hasattr(datamodule, "view"):
        record["data"] = datamodule.view(*module.data_keys(name, datamodule)).provenance()
    return record


def check_and_upgrade(module, checkpoint: dict) -> None:
    """Before Lightning loads `checkpoint` into `module`: the same members and sizes, else one
    line; an older layout's state moved into today's, in place."""
    saved = checkpoint.get("dictlearn_members")
    if saved is None:  # a checkpoint of one dictionary from before sweeps: its keys, prefixed
        saved = {name: {"hyper_parameters": checkpoint.get("hyper_parameters", {})} for name in module.members}
        if len(module.members) == 1:
            name = next(iter(module.members))
            checkpoint["state_dict"] = _prefixed_state(checkpoint["state_dict"], name)
    _move_activity(checkpoint["state_dict"], module.members)
    if set(saved) != set(module.members):
        raise DataError(
            f"checkpoint holds dictionaries {sorted(saved)} but this run has {sorted(module.members)}; "
            "resume with the same sweep file"
        )
    for name, member in module.members.items():
        hyper = saved[name].get("hyper_parameters", {})
        for size in ("d_in", "d_out", "d_sae"):
            mine, theirs = getattr(member, size), hyper.get(size, getattr(member, size))
            if size == "d_out" and theirs is None:
                theirs = hyper.get("d_in")
            if theirs != mine:
                raise DataError(
                    f"{module._label(name)}--ckpt_path: the checkpoint was trained with {size}={theirs} but this "
                    f"run has {size}={mine}; use the data file and --model sizes it was trained with"
                )


def _prefixed_state(state_dict: dict, name: str) -> dict:
    """An old single-dictionary state dict (`W_enc`, `train_sparsity.n_tokens`, ...) in this
    module's layout (`members.<name>.W_enc`, `metrics.<name>.train_sparsity.n_tokens`)."""
    metric_names = ("train_reconstruction", "train_sparsity", "train_density", "val_reconstruction", "val_sparsity")
    out = {}
    for key, value in state_dict.items():
        group = "metrics" if key.split(".")[0] in metric_names else "members"
        out[f"{group}.{name}.{key}"] = value
    return out


def _move_activity(state_dict: dict, names) -> None:
    """In place: a checkpoint from before the dead-latent counters moved to the training side
    (`members.<name>.tokens_since_fired`) in this module's layout (`activity.<name>.…`)."""
    for name in names:
        old = f"members.{name}.tokens_since_fired"
        if old in state_dict:
            state_dict[f"activity.{name}.tokens_since_fired"] = state_dict.pop(old)
