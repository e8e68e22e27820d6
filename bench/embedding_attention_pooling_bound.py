"""How close embedding_attention_pooling can come to the pair it replaces, at B=2048, T=1000 (full
histories, Zipf ids, two fields of 18, fp32, forward+backward): attention_pooling alone on keys
that already exist, the pair (nn.Embedding(sparse=True) lookups + attention_pooling) and the fused
op, interleaved, medians of 5. Both run the same attention kernels, so the fused op's time is at
least the attention alone: its ratio to the pair cannot fall below attention / pair.

Then a training step of each (forward, backward into .grad, din_ops.optim.MBASGD on the tables
with given frequencies, lr 0 so every step does the same work): the pair hands the optimizer one
gradient row per position (2M per table), which it sorts and sums; the fused op one per distinct id.

    python bench/embedding_attention_pooling_bound.py [--dist uniform]
"""
import argparse
import time

import torch

import din_ops
from din_ops.bench import machine, embedding_attention_pooling as E

parser = argparse.ArgumentParser()
parser.add_argument("--dist", default="zipf", choices=("zipf", "uniform"), help="the ids' distribution")
dist = parser.parse_args().dist
machine.keep_freed_memory()  # as the benchmark runner does
c = E.make_case(B=2048, T=1000, min_len=1000, dist=dist)
keys = E._lookup(c).detach().requires_grad_()
leaves_att = [c.query, keys, *c.weights, *c.biases]
leaves = [c.query, *c.tables, *c.weights, *c.biases]
freq = {t: torch.ones(t.shape[0], dtype=torch.int64) for t in c.tables}
opt = din_ops.optim.MBASGD(c.tables, lr=0.0, lam=1e-4, frequencies=freq, padding_idx=0)


def att():
    out = din_ops.attention_pooling(c.query, keys, c.weights, c.biases, lengths=c.lengths)
    torch.autograd.grad(out, leaves_att, c.grad_out)


def pair():
    torch.autograd.grad(E.gather_din_ops(c), leaves, c.grad_out)


def fused():
    torch.autograd.grad(E.fused(c), leaves, c.grad_out)


def train_step(provider):
    def step():
        provider(c).backward(c.grad_out)
        opt.step()
        for p in leaves:
            p.grad = None
    return step


fs = {"attention_pooling alone (keys given)": att, "pair (nn.Embedding + attention_pooling)": pair,
      "fused embedding_attention_pooling": fused,
      "pair + MBASGD step": train_step(E.gather_din_ops), "fused + MBASGD step": train_step(E.fused)}
for f in fs.values():
    f()
ts = {k: [] for k in fs}
for _ in range(5):
    for k, f in fs.items():
        t = time.perf_counter()
        f()
        ts[k].append(time.perf_counter() - t)
med = {k: sorted(v)[2] * 1e3 for k, v in ts.items()}
print(f"{dist} ids")
for k, v in med.items():
    print(f"{k}: {v:.0f} ms")
A, P, F, PS, FS = med.values()
print(f"pair's own work (pair - attention alone): {P - A:.0f} ms")
print(f"fused/pair: {F / P:.2f}; lower bound with zero own work: attention alone/pair = {A / P:.2f}")
print(f"training step, fused/pair: {FS / PS:.2f} (step minus fwd+bwd: pair {PS - P:.0f} ms, fused {FS - F:.0f} ms)")
