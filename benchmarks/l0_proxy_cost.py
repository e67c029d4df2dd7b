"""Cost of the L0 proxy per dictionary at the default compare's shape (2,560 held-out rows, d_in 128,
d_sae 512): one n (before 2026-12-07) against three n from one partial sort (after), and the two
alternatives considered for three n (`torch.topk` of the largest d_sae/2 per row, three
`torch.kthvalue`s). Interleaved, median of 15. Run: .venv/bin/python benchmarks/l0_proxy_cost.py"""

from __future__ import annotations

import time

import torch

from dictlearn.metrics.decoder_projection import NthDecoderProjection, default_n

torch.manual_seed(0)
W, r = torch.randn(512, 128), torch.randn(2560, 128)
unit = torch.nn.functional.normalize(W, dim=-1)
ns = [default_n(512, f) for f in (1 / 8, 1 / 4, 1 / 2)]


def one_n():
    metric = NthDecoderProjection(W, n=ns[1])
    metric.update(r)
    return metric.compute()


def three_n():
    metric = NthDecoderProjection(W)
    metric.update(r)
    return metric.compute()


def topk_half():
    p = (r @ unit.T).flatten()
    top = torch.topk(p, len(r) * ns[2] + 1).values
    return [float(top[len(r) * n]) for n in ns]


def kthvalue_thrice():
    p = (r @ unit.T).flatten()
    return [float(torch.kthvalue(p, len(r) * (512 - n)).values) for n in ns]


CASES = {"one n (before)": one_n, "three n, one partition (after)": three_n, "torch.topk, largest d_sae/2": topk_half,
         "torch.kthvalue x3": kthvalue_thrice}
times = {name: [] for name in CASES}
for _ in range(15):
    for name, case in CASES.items():
        start = time.perf_counter()
        case()
        times[name].append(time.perf_counter() - start)
base = sorted(times["one n (before)"])[7]
for name, found in times.items():
    median = sorted(found)[7]
    print(f"{name}: median {median * 1e3:.1f} ms ({median / base:.2f}x)")
print(f"torch threads {torch.get_num_threads()}")
