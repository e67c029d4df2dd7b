#!/usr/bin/env bash
# Offline quickstart, about 5 minutes on 2 CPU cores, nothing downloaded:
#  1. activations of the embedded default model (a byte-level GPT-2 trained on the Python standard
#     library, shipped in the package) at its middle layer: residual stream + MLP input/output;
#  2. a TopK SAE on the residual stream and a TopK transcoder on the MLP (input -> output);
#  3. `dictlearn evaluate`: reconstruction, sparsity and the model's loss with each spliced in;
#  4. ground truth: an SAE on synthetic data recovers the true features.
set -euo pipefail
out=${1:-quickstart}
mkdir -p "$out"

dictlearn harvest --tokens 200000 --out "$out/acts.h5"

common=(--model.d_sae 1024 --model.k 16 --data.batch_size 1024 --trainer.max_steps 600
        --trainer.enable_progress_bar false)
dictlearn fit --config recipes/topk.yaml --data.path "$out/acts.h5" --data.input_key transformer.h.2 \
  "${common[@]}" --trainer.default_root_dir "$out/sae"
dictlearn fit --config recipes/transcoder.yaml --data.path "$out/acts.h5" \
  --data.input_key transformer.h.2.mlp:input --data.target_key transformer.h.2.mlp \
  "${common[@]}" --trainer.default_root_dir "$out/transcoder"

dictlearn evaluate "$out"/sae/lightning_logs/version_*/export "$out"/transcoder/lightning_logs/version_*/export \
  --data "$out/acts.h5" --out "$out/results.jsonl"
python - "$out/results.jsonl" <<'PY'
import json, sys
keys = ("fvu", "l0", "dead_fraction", "ce_clean", "ce_spliced", "ce_loss_recovered", "kl_div")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['architecture']:>16} {r['hook_name']:<26}", "  ".join(f"{k} {r[k]:.3f}" for k in keys))
PY

dictlearn synth --out "$out/synth.h5" --rows 200000 --d 64 --features 256 --mean-active 4
dictlearn fit --config recipes/topk.yaml --data.path "$out/synth.h5" --data.input_key acts \
  --model.d_sae 512 --model.k 4 --data.batch_size 1024 --trainer.max_steps 1500 \
  --trainer.enable_progress_bar false --trainer.default_root_dir "$out/synth_topk"
dictlearn evaluate "$out"/synth_topk/lightning_logs/version_*/export --data "$out/synth.h5" 2>/dev/null \
  | python -c "import json, sys; r = json.loads(sys.stdin.readline()); print(f'synthetic: MMCS vs true features {r[\"mmcs\"]:.3f}, FVU {r[\"fvu\"]:.3f}')"
