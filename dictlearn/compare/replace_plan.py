"""The dictionaries of `dictlearn compare --replace mlp` (dictlearn/compare/replace.py says what
is compared): one `ReplacementPlan` per replacement, seed and total L0 target, each with its
sweep members (a transcoder per layer, or one cross-layer transcoder)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dictlearn.compare.plan import _init_args, _training, mechanism_class
from dictlearn.compare.replace import REPLACEMENTS


@dataclass(frozen=True)
class MemberPlan:
    """One trained dictionary of a replacement (a sweep member): a layer's transcoder or the CLT.
    Has what `compare.run._fit` reads of a planned member (name, seed, training, calibrated,
    l0_target, build)."""

    name: str
    cls_path: str
    init_args: dict
    input_key: str
    target_key: str
    seed: int
    l0_target: int  # the member's own L0 target (a layer's share, or the total for a CLT)
    calibrated: bool
    training: dict = field(default_factory=dict)

    def build(self, d_in: int, d_out: int):
        import importlib

        module, _, name = self.cls_path.rpartition(".")
        return getattr(importlib.import_module(module), name)(d_in=d_in, d_out=d_out, **self.init_args)


@dataclass(frozen=True)
class ReplacementPlan:
    """One replacement of the comparison: its members (one per layer, or one CLT)."""

    name: str
    architecture: str
    mechanism: str
    mapping: str
    l0_target: int  # total over layers
    d_sae: int  # latents per layer
    seed: int
    layers: tuple[int, ...]
    members: tuple[MemberPlan, ...]

    @property
    def k(self) -> int | None:
        """TopK's latents per layer (None: calibrated)."""
        return self.l0_target // len(self.layers) if self.mechanism == "topk" else None


def plan_replacements(config, layers: list[int], inputs: list[str], outputs: list[str]) -> list[ReplacementPlan]:
    """Every replacement, in order seed, architecture, total L0 target."""
    n, m = len(layers), config.d_sae[0]
    planned = []
    for seed in config.seeds:
        for architecture in config.architectures:
            mechanism, mapping = REPLACEMENTS[architecture]
            calibrated = mechanism_class(mechanism).mechanism.calibrated
            training = _training(config, mechanism)
            for target in config.l0:
                name = f"{architecture}_l0-{target}_s{seed}"
                if mapping == "clt":
                    args = _init_args(config, mechanism, "transcoder", n * m, target // n) | {"n_layers": n}
                    if calibrated:
                        args.pop("k", None)
                    cls = "dictlearn.dictionaries.crosslayer." + ("CrossLayerTopK" if mechanism == "topk"
                                                                  else "CrossLayerJumpReLU")
                    members = (MemberPlan(name, cls, args, ",".join(inputs), ",".join(outputs), seed, target,
                                          calibrated, training),)
                else:
                    args = _init_args(config, mechanism, mapping, m, target // n)
                    cls = mechanism_class(mechanism)
                    members = tuple(MemberPlan(f"{name}_layer{layer}", f"{cls.__module__}.{cls.__name__}", args, i_key,
                                               o_key, seed, target // n, calibrated, training)
                                    for layer, i_key, o_key in zip(layers, inputs, outputs))
                planned.append(ReplacementPlan(name, architecture, mechanism, mapping, target, m, seed, tuple(layers),
                                               members))
    return planned
