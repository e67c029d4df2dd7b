#!/usr/bin/env bash
# Offline quickstart on 2 CPU cores, nothing downloaded. Everything it writes (~360 MB) goes under
# one scratch folder, runs/quickstart/ by default (git ignores runs/), or the folder given as $1:
#  1. activations of the embedded default model (a byte-level GPT-2 trained on the Python standard
#     library, shipped in the package) at its middle layer: residual stream + MLP input/output;
#  2. one sweep, one pass over the data: a TopK SAE on the residual stream and a TopK transcoder
#     on the MLP (input -> output);
#  3. `dictlearn evaluate`: reconstruction, sparsity and the model's loss with each spliced in;
#  4. ground truth: an SAE on synthetic data recovers the true features.
# Rerunnable: it replaces only what an earlier quickstart wrote there (the folder holds its
# marker file); a folder that holds anything else is refused, and nothing in it is touched.
set -euo pipefail
out=${1:-runs/quickstart}
marker="$out/.dictlearn-quickstart"
if [ -e "$out" ] && [ ! -e "$marker" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
  echo "quickstart: $out already holds files that a quickstart did not write; give another folder: $0 DIR" >&2
  exit 2
fi
mkdir -p "$out"
touch "$marker"
rm -rf "$out/sweep" "$out/synth_topk" "$out/results.jsonl" "$out/acts.h5" "$out/synth.h5" "$out/sweep.yaml"
echo "quickstart: writing under $out/" >&2

dictlearn harvest --tokens 200000 --out "$out/acts.h5"

cat > "$out/sweep.yaml" <<'YAML'
sweep:
  sae:
    dictionary: {class_path: dictlearn.TopKSAE, init_args: {d_sae: 1024, k: 16}}
  transcoder:
    dictionary: {class_path: dictlearn.TopKSAE, init_args: {d_sae: 1024, k: 16, transcoder: true, b_dec_init: mean}}
    input_key: transformer.h.2.mlp:input
    target_key: transformer.h.2.mlp
YAML
dictlearn fit --config "$out/sweep.yaml" --data.path "$out/acts.h5" --data.input_key transformer.h.2 \
  --data.batch_size 1024 --trainer.max_steps 600 --trainer.default_root_dir "$out/sweep"

run="$out/sweep/lightning_logs/version_0"
dictlearn evaluate "$run/exports/sae" "$run/exports/transcoder" --data "$out/acts.h5" --out "$out/results.jsonl"
python - "$out/results.jsonl" <<'PY'
import json, sys
keys = ("fvu", "l0", "dead_fraction", "ce_clean", "ce_spliced", "ce_loss_recovered", "kl_div")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['architecture']:>16} {r['hook_name']:<26}", "  ".join(f"{k} {r[k]:.3f}" for k in keys))
PY

dictlearn synth --out "$out/synth.h5" --rows 200000 --d 64 --features 256 --mean-active 4
dictlearn fit --config topk --data.path "$out/synth.h5" --data.input_key acts \
  --model.d_sae 512 --model.k 4 --data.batch_size 1024 --trainer.max_steps 1500 \
  --trainer.default_root_dir "$out/synth_topk"
dictlearn evaluate "$out/synth_topk/lightning_logs/version_0/export" --data "$out/synth.h5" 2>/dev/null \
  | python -c "import json, sys; r = json.loads(sys.stdin.readline()); print(f'synthetic: MMCS vs true features {r[\"mmcs\"]:.3f}, FVU {r[\"fvu\"]:.3f}')"
