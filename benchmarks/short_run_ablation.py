"""One factor at a time: what in compare's TopK short run (k 16, d_sae 256, 100 steps of 1,024 rows)
costs FVU against the peers' plain loops (benchmarks/RESULTS.md, "Short-run TopK against the peers").

    python benchmarks/short_run_ablation.py ACTS.h5 KEY baseline,lr3e-3,decay0,block16 0,1,2
    python benchmarks/short_run_ablation.py ACTS.h5 KEY combo:noscale_init+enc0577+decay0+block16 0,1,2

One line of JSON per run on stdout (held-out FVU on the file's held-out documents, seconds, the
largest gradient norm). One thread, so it can run beside other work; a diagnosis, not a timing.
"""
import json
import logging
import sys
import time
import warnings

warnings.filterwarnings("ignore")
logging.getLogger("lightning").setLevel(logging.ERROR); logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
import h5py
import torch

torch.set_num_threads(1)
import lightning as L
from dictlearn import ActivationDataModule, DictionaryTraining, Member, TopKSAE, TrainingConfig
from dictlearn.data.split import HeldOutSplit

PATH, KEY = sys.argv[1], sys.argv[2]
with h5py.File(PATH) as f:
    n = f[KEY].shape[0]
    a, b = HeldOutSplit.from_file(PATH, n).heldout
    X = torch.from_numpy(f[KEY][a:b]).float()  # [held-out rows, d]

def fvu(model):
    model.eval()
    with torch.no_grad():
        xh = model(X)
    return float(((X - xh) ** 2).sum() / ((X - X.mean(0)) ** 2).sum())

BASE_T = dict(lr=1e-3, adam_betas=(0.9, 0.999), adam_eps=1e-8, lr_warmup_fraction=0.0, lr_decay_fraction=0.3,
              init_scale_from_data=True, dead_window_tokens=102400 // 3)
class GN(L.Callback):
    def __init__(self): self.norms = []
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append(float(torch.sqrt(sum((p.grad ** 2).sum() for p in pl_module.parameters() if p.grad is not None))))

def run(name, seed, t=None, clip=1.0, normalize="mean_norm_sqrt_d", model_kw=None, unit_norm=True, data_kw=None, enc_mult=None):
    torch.manual_seed(seed)
    m = TopKSAE(d_in=128, d_sae=256, k=16, **(model_kw or {}))
    if not unit_norm:
        m.unit_norm_decoder = False
    if enc_mult is not None:
        with torch.no_grad():
            m.W_enc.mul_(enc_mult)
    tr = TrainingConfig(**{**BASE_T, **(t or {})})
    data = ActivationDataModule(PATH, input_key=KEY, batch_size=1024, normalize=normalize, **(data_kw or {}))
    mod = DictionaryTraining({"m": Member(m, seed=None if enc_mult is not None else seed, training=tr)})
    t0 = time.time()
    L.Trainer(max_steps=100, gradient_clip_val=clip, use_distributed_sampler=False, accelerator="cpu",
              enable_progress_bar=False, logger=False, enable_checkpointing=False, enable_model_summary=False,
              num_sanity_val_steps=0, limit_val_batches=0, callbacks=[gn := GN()]).fit(mod, data)
    r = dict(name=name, seed=seed, fvu=fvu(mod.members["m"]), secs=round(time.time() - t0, 1), gradnorm_max=round(max(gn.norms), 3), gradnorm_first=round(gn.norms[0], 3))
    print(json.dumps(r), flush=True)

VARIANTS = {
    "baseline": {},
    "lr3e-3": dict(t=dict(lr=3e-3)),
    "decay0": dict(t=dict(lr_decay_fraction=0.0)),
    "noclip": dict(clip=None),
    "nonorm": dict(normalize="none"),
    "noscale_init": dict(t=dict(init_scale_from_data=False)),
    "bdec_mean": dict(model_kw=dict(b_dec_init="mean")),
    "noauxk": dict(model_kw=dict(auxk_alpha=0.0)),
    "no_unitnorm": dict(unit_norm=False),
    "block16": dict(data_kw=dict(block_size=16)),
    "enc1": dict(enc_mult=1.0),
    "enc0577": dict(enc_mult=0.577),
    "enc03": dict(enc_mult=0.3),
    "block1": dict(data_kw=dict(block_size=1)),
    "block64": dict(data_kw=dict(block_size=64)),
    "eps625": dict(t=dict(adam_eps=6.25e-10)),
}
if __name__ == "__main__":
    names = sys.argv[3].split(",")
    seeds = [int(s) for s in sys.argv[4].split(",")]
    for s in seeds:
        for nm in names:
            if nm.startswith("combo:"):
                kw = {}
                for part in nm[6:].split("+"):
                    v = VARIANTS[part]
                    for k2, v2 in v.items():
                        kw[k2] = {**kw.get(k2, {}), **v2} if isinstance(v2, dict) else v2
                run(nm, s, **kw)
            else:
                run(nm, s, **VARIANTS[nm])
