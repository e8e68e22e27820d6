"""How close embedding_attention_pooling can come to the pair it replaces, at B=2048, T=1000 (full
histories, Zipf ids, two fields of 18, fp32, forward+backward): attention_pooling alone on keys
that already exist, the pair (nn.Embedding(sparse=True) lookups + attention_pooling) and the fused
op, interleaved, medians of 5. Both run the same attention kernels, so the fused op's time is at
least the attention alone: its ratio to the pair cannot fall below attention / pair.

    python bench/embedding_attention_pooling_bound.py
"""
import time, torch
import din_ops
from din_ops.bench import machine, embedding_attention_pooling as E
machine.keep_freed_memory()  # as the benchmark runner does
c = E.make_case(B=2048, T=1000, min_len=1000, dist="zipf")
keys = E._lookup(c).detach().requires_grad_()
leaves_att = [c.query, keys, *c.weights, *c.biases]
leaves = [c.query, *c.tables, *c.weights, *c.biases]
def att():
    out = din_ops.attention_pooling(c.query, keys, c.weights, c.biases, lengths=c.lengths)
    torch.autograd.grad(out, leaves_att, c.grad_out)
def pair():
    torch.autograd.grad(E.gather_din_ops(c), leaves, c.grad_out)
def fused():
    torch.autograd.grad(E.fused(c), leaves, c.grad_out)
fs = {"attention_pooling alone (keys given)": att, "pair (nn.Embedding + attention_pooling)": pair,
      "fused embedding_attention_pooling": fused}
for f in fs.values(): f()
ts = {k: [] for k in fs}
for _ in range(5):
    for k, f in fs.items():
        t = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t)
med = {k: sorted(v)[2] * 1e3 for k, v in ts.items()}
for k, v in med.items(): print(f"{k}: {v:.0f} ms")
A, P, F = med.values()
print(f"pair's own work (pair - attention alone): {P - A:.0f} ms")
print(f"fused/pair: {F / P:.2f}; lower bound with zero own work: attention alone/pair = {A / P:.2f}")
