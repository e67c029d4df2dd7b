"""Figures and the report of a dictlearn comparison (see docs/analysis.md).

This folder sits at the repository root and is installed as `dictlearn.analysis` (pyproject.toml
`package-dir`), so no package named `analysis` lands in site-packages. One figure family per module
(frontier, sparsity, shrinkage, recovery, density, curves), each runnable as
`python -m dictlearn.analysis.<module> RESULTS.jsonl --out DIR`; `dictlearn analyse` draws all
of them and writes the report. The package's top level stays empty of imports so that
`python -m dictlearn.analysis.<module>` runs that module once, as __main__.
"""

__all__ = ["AnalysisError", "analyse", "write_report"]


def __getattr__(name: str):
    # lazy: importing a submodule here would make `python -m dictlearn.analysis.<it>` import it twice
    if name in ("analyse", "write_report"):
        from dictlearn.analysis import report

        return getattr(report, name)
    if name == "AnalysisError":
        from dictlearn.analysis.results import AnalysisError

        return AnalysisError
    raise AttributeError(f"module 'dictlearn.analysis' has no attribute {name!r}")
