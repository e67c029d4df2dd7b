"""`dictlearn compare`, the main job: harvest -> train every architecture at matched L0 -> evaluate
-> results and report, resumable (docs/compare.md).

    from dictlearn.compare import CompareConfig, compare
    compare(CompareConfig(out="runs/cmp", architectures=["topk", "relu_l1"], l0=[8, 32]))
"""

from dictlearn.lazy import lazy_attributes

# Loaded on first use: `dictlearn compare --help` imports dictlearn.compare.plan, and must not pay
# for the training stack that dictlearn.compare.run imports.
_PUBLIC = {"CompareConfig": "dictlearn.compare.plan", "Planned": "dictlearn.compare.plan",
           "plan": "dictlearn.compare.plan", "Stopped": "dictlearn.compare.run", "compare": "dictlearn.compare.main"}
__getattr__, __dir__ = lazy_attributes(__name__, _PUBLIC)
__all__ = sorted(_PUBLIC)
