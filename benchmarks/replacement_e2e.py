"""Usage: python benchmarks/replacement_e2e.py TOKENS STEPS FILE.h5 (the 2026-12-07 run: 200000 600 acts.h5).

End to end on the embedded model: harvest every layer, train a TopK CLT beside four per-layer TopK
transcoders in one sweep (k 8 per layer each: total L0 32), splice each set into every MLP."""
import json
import os
import sys
import time

import lightning as L
from dictlearn import ActivationDataModule, TopKSAE
from dictlearn.dictionaries import CrossLayerTopK
from dictlearn.downstream import heldout_batches
from dictlearn.harvest import harvest, layer_hooks
from dictlearn.models.hooks import standard_hooks
from dictlearn.models.loading import load_model
from dictlearn.replacement import TranscoderSet, mlp_sites, replacement_metrics
from dictlearn.training import DictionaryTraining, Member

out, tokens, steps, k, m = sys.argv[3], int(sys.argv[1]), int(sys.argv[2]), 8, 512
lm = load_model(None)
t = time.time()
if not os.path.exists(out):
    harvest(lm, layer_hooks(lm.model, "all"), out, tokens, 128, progress=False)
print("harvest", round(time.time() - t), "s", flush=True)
n = 4
ins = [standard_hooks(lm.model, i)["mlp_in"] for i in range(n)]
outs = [standard_hooks(lm.model, i)["mlp_out"] for i in range(n)]
L.seed_everything(0)
clt = CrossLayerTopK(n_layers=n, d_in=n * 128, d_sae=n * m, k=k)
members = {"clt_topk": Member(clt, ",".join(ins), ",".join(outs), seed=0)}
for i in range(n):
    members[f"tc{i}"] = Member(TopKSAE(d_in=128, d_sae=m, k=k, transcoder=True), ins[i], outs[i], seed=0)
training = DictionaryTraining(members)
data = ActivationDataModule(out, input_key=ins[0], target_key=outs[0], batch_size=1024)
t = time.time()
L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
          enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
          gradient_clip_val=1.0).fit(training, data)
print("train", round(time.time() - t), "s", flush=True)
batches = heldout_batches(lm.tokenizer, None, 128, 64, True, 16, data=out)
sites = mlp_sites(lm.model, range(n))
for name, replacement in [("clt_topk", training.members["clt_topk"].eval()),
                          ("per_layer_topk", TranscoderSet([training.members[f"tc{i}"].eval() for i in range(n)]))]:
    t = time.time()
    result = replacement_metrics(lm.model, sites, replacement, batches)
    result["seconds"] = round(time.time() - t, 1)
    print(name, json.dumps(result), flush=True)
