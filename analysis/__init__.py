"""Figures and the report of a dictlearn comparison (see docs/analysis.md).

One figure family per module (frontier, sparsity, shrinkage, recovery, density, curves), each
runnable as `python -m analysis.<module> RESULTS.jsonl --out DIR`; `python -m analysis` draws
all of them and writes the report. The package's top level stays empty of imports so that
`python -m analysis.<module>` runs that module once, as __main__.
"""

__all__ = ["AnalysisError", "analyse", "write_report"]


def __getattr__(name: str):
    # lazy: importing a submodule here would make `python -m analysis.<it>` import it twice
    if name in ("analyse", "write_report"):
        from analysis import report

        return getattr(report, name)
    if name == "AnalysisError":
        from analysis.results import AnalysisError

        return AnalysisError
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
