#!/usr/bin/env bash
# A separate virtual environment with dictlearn and its peers (SAELens, sparsify, dictionary_learning,
# circuit-tracer)
# for benchmarks/throughput.py; the project's own .venv is left alone. Safe to run again.
#
#     bash benchmarks/install_peers.sh              # creates or updates .bench-venv
#     bash benchmarks/install_peers.sh /some/venv
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.bench-venv}"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip --quiet --disable-pip-version-check "$@"; }

# The CPU build of torch first, so nothing below resolves `torch>=` to a CUDA build.
pip install torch==2.13.0
pip install -e "$root[dev,bench]"  # the `bench` extra: SAELens and sparsify (eai-sparsify)

# dictionary_learning requires nnsight, whose requirements pull a CUDA torch (and torchvision,
# diffusers, umap-learn, ...). Its trainers import only nnsight's module tree, which needs
# python-socketio; the rest of either package's requirements are unused here.
pip install --no-deps dictionary-learning==0.1.0 nnsight==0.3.7
pip install python-socketio

# circuit-tracer 0.5 (benchmarks/check_circuit_tracer.py) asks for nnsight>=0.6, which the pin above
# rules out; nnsight is imported by its nnsight backend only, and the TransformerLens backend used
# here needs transformer-lens (installed with sae-lens), einops, safetensors and PyYAML.
pip install --no-deps circuit-tracer==0.5.0
# circuit-tracer 0.5 imports names that huggingface_hub >= 1 removed and asks for transformers <=
# 4.57.3; the registry's newest sae-lens resolves to transformer-lens 3 (transformers >= 5). Pin the
# older line all of them accept (found 2026-12-07); transformer-lens 2 holds numpy < 2, which the
# newest pyarrow (through datasets) refuses, so pyarrow too.
pip install "transformers>=4.56,<=4.57.3" "huggingface_hub<1.0" "transformer-lens>=2.16,<3" "pyarrow<20"

"$venv/bin/python" - <<'EOF'
import importlib.metadata as metadata
import warnings

warnings.filterwarnings("ignore")
import torch
import dictionary_learning.trainers  # noqa: F401  (fails here if an import is missing)
import circuit_tracer.replacement_model.replacement_model_transformerlens  # noqa: F401
import circuit_tracer.utils.caching  # noqa: F401

assert torch.__version__.endswith("+cpu"), f"torch {torch.__version__}: expected the CPU build"
for name in ("torch", "dictlearn", "sae-lens", "eai-sparsify", "dictionary-learning", "nnsight", "circuit-tracer",
             "transformer-lens"):
    print(f"{name} {metadata.version(name)}")
EOF
