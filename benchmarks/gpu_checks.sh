#!/usr/bin/env bash
# The GPU checks of a lent-machine session, in one call (the device budget is minutes, each start
# costs one): the CUDA tests, then the throughput benchmark at the GPU workload in bf16
# (dense and automatic paths) and fp32 (automatic path). Each step has its own time limit, so one
# failure cannot eat the others' time; every output lands in OUT_DIR.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [WHEELS_DIR] [PEERS]
#
# WHEELS_DIR: wheels to install offline first (the GPU image lacks jsonargparse, which
# `dictlearn fit` needs). PEERS: the throughput benchmark's --peers value (default: none).
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUT_DIR [WHEELS_DIR] [PEERS]}
wheels=${2:-}
peers=${3:-none}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
  if [ -n "$wheels" ]; then "$py" -m pip install -q --no-index --find-links "$wheels" "jsonargparse[signatures]"; fi
} >"$out/machine.txt" 2>&1

timeout 170 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py >"$out/test_cuda.txt" 2>&1
echo "exit $?" >>"$out/test_cuda.txt"

workload=(--device cuda --d-in 768 --d-sae 24576 --k 32 --steps 10 --threads 8 --peers "$peers")
timeout 240 "$py" benchmarks/throughput.py "${workload[@]}" --dtype bf16 >"$out/throughput_bf16.txt" 2>&1
echo "exit $?" >>"$out/throughput_bf16.txt"
timeout 150 "$py" benchmarks/throughput.py "${workload[@]}" --dtype fp32 --paths auto >"$out/throughput_fp32.txt" 2>&1
echo "exit $?" >>"$out/throughput_fp32.txt"
