#!/usr/bin/env bash
# Offline quickstart: synthetic activations with known features -> TopK and ReLU-L1 SAEs ->
# exports -> how well each recovered the true features. A few minutes on 2 CPU cores.
set -euo pipefail
out=${1:-quickstart}
mkdir -p "$out"
dictlearn synth --out "$out/synth.h5" --rows 200000 --d 64 --features 256 --mean-active 4
for recipe in topk relu_l1; do
  dictlearn fit --config recipes/$recipe.yaml --data.path "$out/synth.h5" --data.input_key acts \
    --model.d_sae 512 --data.batch_size 1024 --trainer.max_steps 1500 \
    --trainer.default_root_dir "$out/$recipe" $( [ $recipe = topk ] && echo --model.k 4 ) \
    $( [ $recipe = relu_l1 ] && echo --model.l1_coefficient 1.0 --model.lr 0.003 )
done
python - "$out" <<'PY'
import sys, glob, h5py, torch
import dictlearn
from dictlearn.metrics import mmcs
out = sys.argv[1]
features = torch.from_numpy(h5py.File(f"{out}/synth.h5")["features"][:])
for recipe in ("topk", "relu_l1"):
    export = sorted(glob.glob(f"{out}/{recipe}/lightning_logs/version_*/export"))[-1]
    model = dictlearn.load(export)
    print(f"{recipe:8s} export {export}: MMCS vs true features {mmcs(features, model.W_dec.detach()):.3f}")
PY
