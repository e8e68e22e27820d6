"""Repeated use and threads.

(a) Memory: 1,000 forward + backward calls of each op at a small shape add no resident memory
    (nor live Python objects) after the first calls. Measured in a subprocess with a fixed glibc
    allocator behaviour (one arena, fixed mmap/trim thresholds) so that RSS reflects what is held.
(b) Threads: four Python threads running the ops at once (forward + backward, padded and jagged
    layouts, Dice, the MBA penalty and update) get results bit-identical to single-thread calls,
    which themselves match din_ops.reference.
"""
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import din_ops
from din_ops import reference as R

# --- (a) memory ----------------------------------------------------------------------------------
MEMORY_SCRIPT = r'''
import gc, json, os, sys, time
import torch, din_ops
torch.set_num_threads(2)
torch.manual_seed(0)
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


B, T, D, H = 16, 32, 8, 16  # a leaked intermediate of any size shows within 900 calls
q = torch.randn(B, D, requires_grad=True)
k = torch.randn(B, T, D, requires_grad=True)
L = torch.randint(0, T + 1, (B,))
L[0] = T
offsets = torch.cat([torch.zeros(1, dtype=torch.int64), L.cumsum(0)])
kj = torch.randn(int(L.sum()), D, requires_grad=True)
W = [torch.randn(H, 4 * D, requires_grad=True), torch.randn(1, H, requires_grad=True)]
b = [torch.randn(H, requires_grad=True), torch.randn(1, requires_grad=True)]
alpha = [torch.zeros(H, requires_grad=True)]
rm, rv = [torch.zeros(H)], [torch.ones(H)]
x = torch.randn(B, T, H, requires_grad=True)
xa = torch.zeros(H, requires_grad=True)
dm, dv = torch.zeros(H), torch.ones(H)
NE = 64
table = torch.randn(NE, D)
state = torch.zeros(NE)
idx = torch.randint(0, NE, (32,))
grad = torch.randn(32, D)
freq = torch.randint(0, 5, (NE,))
wp = torch.randn(NE, D, requires_grad=True)


def ap_padded():
    out = din_ops.attention_pooling(q, k, W, b, lengths=L, normalization="softmax")
    out.sum().backward()


def ap_jagged_dice():
    out = din_ops.attention_pooling(q, kj, W, b, offsets=offsets, activation="dice", dice_alpha=alpha,
                                    dice_running_mean=rm, dice_running_var=rv)
    out.sum().backward()


def dice():
    y = din_ops.dice(x, xa, dm, dv, lengths=L)
    y.sum().backward()


def mba_update():
    din_ops.mba_sparse_update_(table, idx, grad, freq, lr=1e-3, lam=0.1, optimizer="adagrad_rowwise",
                               state=state)


def mba_penalty():
    din_ops.mba_penalty(wp, idx, freq, 0.1).backward()


def count():
    din_ops.count_frequencies(idx, NE, padding_idx=0)


emb = torch.nn.Embedding(NE, D, sparse=True)
head = torch.nn.Linear(D, 1)
opt = din_ops.optim.MBAAdagrad(list(emb.parameters()) + list(head.parameters()), lr=1e-3, lam=0.1)


def optim_step():
    opt.zero_grad()
    head(emb(idx)).sum().backward()
    opt.step()


def live_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


result = {}
t0 = time.time()
for name, fn in [("attention_pooling padded", ap_padded), ("attention_pooling jagged dice", ap_jagged_dice),
                 ("dice", dice), ("mba_sparse_update_", mba_update), ("mba_penalty", mba_penalty),
                 ("count_frequencies", count), ("MBAAdagrad step", optim_step)]:
    for _ in range(100):
        fn()
    gc.collect()
    r100, t100 = rss(), live_tensors()
    for _ in range(900):
        fn()
    gc.collect()
    result[name] = dict(rss_growth=rss() - r100, tensor_growth=live_tensors() - t100)
    for p in [q, k, kj, x, xa, wp] + W + b + alpha:
        p.grad = None
result["seconds"] = time.time() - t0
print("RESULT " + json.dumps(result))
'''

MIB = 1 << 20


def test_repeated_calls_hold_no_memory():
    # one arena, fixed mmap and trim thresholds: freed memory goes back the same way every call;
    # passive OpenMP waits keep the run short on a loaded machine
    env = dict(os.environ, MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="131072",
               MALLOC_TRIM_THRESHOLD_="131072", MALLOC_TOP_PAD_="0", OMP_NUM_THREADS="2",
               OMP_WAIT_POLICY="PASSIVE")
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    seconds = result.pop("seconds")
    assert seconds < 20, f"too slow for a test: {seconds:.1f} s"
    grew = {name: m for name, m in result.items() if m["rss_growth"] >= 2 * MIB or m["tensor_growth"] > 0}
    assert not grew, f"memory held across calls 100..1000: {grew}"
    assert len(result) == 7


# --- (b) threads ---------------------------------------------------------------------------------
B, T, D, H, C = 24, 40, 16, 12, 10
NE, ME = 500, 300
THREADS, ROUNDS = 4, 8


def _case(seed):
    g = torch.Generator().manual_seed(seed)
    L = torch.randint(0, T + 1, (B,), generator=g)
    L[0], L[1] = 0, T
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), L.cumsum(0)])
    return dict(
        q=torch.randn(B, D, generator=g), k=torch.randn(B, T, D, generator=g), L=L, offsets=offsets,
        W=[torch.randn(H, 4 * D, generator=g) * 0.3, torch.randn(1, H, generator=g) * 0.3],
        b=[torch.randn(H, generator=g) * 0.1, torch.randn(1, generator=g) * 0.1],
        x=torch.randn(B, T, C, generator=g) * 2 + 1, alpha=torch.rand(C, generator=g),
        gamma=torch.rand(C, generator=g) + 0.5, beta=torch.randn(C, generator=g) * 0.1,
        table=torch.randn(NE, D, generator=g), idx=torch.randint(0, NE, (ME,), generator=g),
        grad=torch.randn(ME, D, generator=g), freq=torch.randint(0, 4, (NE,), generator=g),
        gy=torch.randn(B, T, C, generator=g), go=torch.randn(B, D, generator=g))


def _leaves(ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _attention(c, jagged, fn=din_ops.attention_pooling):
    q, = _leaves([c["q"]])
    W, b = _leaves(c["W"]), _leaves(c["b"])
    if jagged:
        k, = _leaves([R.padded_to_jagged(c["k"], c["L"])])
        out, attn = fn(q, k, W, b, offsets=c["offsets"], normalization="softmax", return_weights=True)
    else:
        k, = _leaves([c["k"]])
        out, attn = fn(q, k, W, b, lengths=c["L"], normalization="none", return_weights=True)
    (out * c["go"]).sum().backward()
    return [out.detach(), attn.detach(), q.grad, k.grad] + [t.grad for t in W + b]


def _dice(c, fn=din_ops.dice):
    x, alpha, gamma, beta = _leaves([c["x"], c["alpha"], c["gamma"], c["beta"]])
    rm, rv = torch.zeros(C), torch.ones(C)
    y = fn(x, alpha, rm, rv, lengths=c["L"], gamma=gamma, beta=beta)
    (y * c["gy"]).sum().backward()
    return [y.detach(), x.grad, alpha.grad, gamma.grad, beta.grad, rm, rv]


def _penalty(c, fn=din_ops.mba_penalty):
    w, = _leaves([c["table"]])
    p = fn(w, c["idx"], c["freq"], 0.3)
    p.backward()
    return [p.detach(), w.grad]


def _update(c, fn=din_ops.mba_sparse_update_):
    w, state = c["table"].clone(), torch.zeros(NE, D)
    for _ in range(2):
        fn(w, c["idx"], c["grad"], c["freq"], lr=0.05, lam=0.3, optimizer="adagrad", state=state)
    return [w, state]


def _all(c):
    return (_attention(c, False) + _attention(c, True) + _dice(c) + _penalty(c) + _update(c))


def _reference(c):
    return (_attention(c, False, R.attention_pooling) + _attention(c, True, R.attention_pooling)
            + _dice(c, R.dice) + _penalty(c, R.mba_penalty) + _update(c, R.mba_sparse_update_))


def test_single_thread_results_match_reference():
    """The single-thread results the threaded runs are compared with are right."""
    for got, want in zip(_all(_case(0)), _reference(_case(0))):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("threads", [1, 2], ids=["intra1", "intra2"])
def test_threads_are_bit_identical_to_single_thread(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cases = [_case(seed) for seed in range(THREADS)]
        expected = [_all(c) for c in cases]
        results, errors = {}, []
        barrier = threading.Barrier(THREADS)

        def worker(i):
            try:
                barrier.wait()
                results[i] = [_all(cases[i]) for _ in range(ROUNDS)]
            except Exception as e:  # reported below, with the thread's index
                errors.append((i, repr(e)))

        pool = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in pool), "a thread hung"
        assert not errors, errors
        for i in range(THREADS):
            for r, got in enumerate(results[i]):
                for j, (a, e) in enumerate(zip(got, expected[i])):
                    assert a.dtype == e.dtype and torch.equal(a, e), f"thread {i}, round {r}, output {j}"
    finally:
        torch.set_num_threads(previous)
