"""Usage: python benchmarks/replace_step_cost.py — CPU-ms per training step (one thread, batch 1,024) of the
dictionaries `dictlearn compare --replace mlp` trains on the embedded model (4 layers of 128): forward,
backward and Adam of each alone, at 128 and 256 latents per layer (docs/compare.md, "Replacement models")."""
import time, torch
from dictlearn.dictionaries.crosslayer import CrossLayerTopK, CrossLayerJumpReLU
from dictlearn import TopKSAE
torch.set_num_threads(1)
def cost(model, x, y, n=6):
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for i in range(n + 2):
        if i == 2: t = time.process_time()
        out = model(x)
        yhat = out[0] if isinstance(out, tuple) else out
        loss = ((yhat - y) ** 2).mean(); loss.backward(); opt.step(); opt.zero_grad()
    return (time.process_time() - t) / n * 1000
for m in (128, 256):
    x, y = torch.randn(1024, 512), torch.randn(1024, 512)
    clt = CrossLayerTopK(n_layers=4, d_in=512, d_out=512, d_sae=4 * m, k=m // 8)
    jr = CrossLayerJumpReLU(n_layers=4, d_in=512, d_out=512, d_sae=4 * m)
    tc = TopKSAE(d_in=128, d_out=128, d_sae=m, k=m // 8, transcoder=True)
    print(m, "clt_topk ms", round(cost(clt, x, y)), "clt_jr ms", round(cost(jr, x, y)),
          "tc ms", round(cost(tc, x[:, :128], y[:, :128])), flush=True)
