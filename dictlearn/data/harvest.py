"""Moved to `dictlearn.harvest`; this alias stays only until dictlearn/compare/run.py imports from there.

Delete it then: the data stage must not reach forward to the harvest stage (or to the models).
"""

from __future__ import annotations

import importlib


def __getattr__(name: str):
    return getattr(importlib.import_module("dictlearn.harvest.activations"), name)
