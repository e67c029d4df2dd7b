# The two commands of a fresh machine (python3 and make are all it needs; README.md, "Two commands"):
#   make compare   set up $(VENV) if needed, then the main job: dictlearn compare --out $(OUT)
#   make test      set up $(VENV) if needed, then the tests: python -m pytest $(PYTEST_ARGS)
# Variables: VENV (default .venv; CI uses .ci/venv), OUT, COMPARE_ARGS (more compare flags),
# PYTEST_ARGS (default -q), TORCH (the torch requirement installed first), PYTHON (makes the venv).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
OUT ?= runs/cmp
COMPARE_ARGS ?=
PYTEST_ARGS ?= -q

# Written last by the set-up, so a set-up that stopped half-way runs again; pyproject.toml newer
# than it (a changed dependency list) runs it again too.
STAMP := $(VENV)/.dictlearn-setup-done

.PHONY: compare test venv

compare: $(STAMP)
	$(VENV)/bin/dictlearn compare --out $(OUT) $(COMPARE_ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

venv: $(STAMP)

# torch first: the package's `torch>=` requirement would otherwise let pip pick a build (a CUDA
# build from an index that serves one). A torch already in the venv is kept, whatever its build.
# pip >= 21.3 installs a pyproject-only package editable (PEP 660); Python 3.10.0's pip is older.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet "pip>=21.3"
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	touch $@
