"""`dictlearn compare`, the main job: harvest -> train every architecture at matched L0 -> evaluate
-> results and report, resumable (docs/compare.md).

    from dictlearn.compare import CompareConfig, compare
    compare(CompareConfig(out="runs/cmp", architectures=["topk", "relu_l1"], l0=[8, 32]))
"""

from dictlearn.compare.plan import CompareConfig, Planned, plan
from dictlearn.compare.run import Stopped, compare

__all__ = ["CompareConfig", "Planned", "Stopped", "compare", "plan"]
