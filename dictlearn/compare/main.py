"""`compare(config)`: the single-site comparison (dictlearn/compare/run.py) or, with `replace`,
whole replacement models (dictlearn/compare/replace_run.py)."""

from __future__ import annotations

from pathlib import Path

from dictlearn.compare.plan import CompareConfig


def compare(config: CompareConfig) -> Path:
    """Run (or resume) the comparison `config` describes; -> the run folder. Raises
    `dictlearn.compare.run.Stopped` on a signal."""
    if config.replace is not None:
        from dictlearn.compare.replace_run import compare_replacements

        return compare_replacements(config)
    from dictlearn.compare.run import compare as compare_single

    return compare_single(config)
