"""DIN on TorchRec (din_ops.compat.torchrec) against din_ops' own DIN and MBA optimizers.

- The model: built from a ``din_ops.models.DIN`` (or from the same seed) it gives DIN's logits on the
  jagged history, for one candidate per user and for C candidates.
- The MBA penalty equals ``din_ops.mba_penalty`` on the batch's ids (padding id, n_j == 0).
- MBA on one process, unfused (the unsharded ``EmbeddingCollection``, torch optimizers): the
  penalty on the looked-up rows trains the tables as ``din_ops.optim.MBASGD`` /
  ``MBAAdagrad`` do, with given frequencies and counted on the fly.
- ``DistributedModelParallel`` with the fused TBE optimizers (exact SGD, Adagrad, row-wise
  Adagrad), on 1 and 2 gloo processes (CPU), row-wise and table-wise: each process takes half of
  each global batch, and the logits, losses and every parameter after a few steps equal one process
  of din_ops' DIN with ``MBASGD`` / ``MBAAdagrad`` (``rowwise`` to match) on the global batch.
  Under row-wise sharding each process holds half the rows.
- The unfused tables under 2 processes: the unsharded model in ``DistributedDataParallel``
  (replicated tables, averaged dense gradients) with ``torch.optim.Adagrad`` equals it too.
- din_ops imports and runs without torchrec.

"Counted on the fly" means: each batch's occurrences are added to the counts before its step. The
reference feeds ``MBAAdagrad`` counts updated that way rather than its own online counts, which
tally the entries of the sparse gradient: autograd's sum of a table's two lookups (candidates and
history) merges some entries, so they can fall short of the occurrences.
- ``examples/train_din_torchrec.py`` under torchrun on a slice of MovieLens-100K.

float32 (TorchRec's tables are fp32 or fp16); tolerance 2e-5 relative to each tensor's size.
The attention unit normalizes with ``none`` (the paper): under softmax the output layer's bias has
a gradient that is zero but for rounding, which Adagrad turns into a step of any sign.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import din_ops
import din_ops.models
import din_ops.optim
from compat_libs import require



class _LazyModule:
    """din_ops.compat.torchrec, imported (torchrec installed) when a test first uses it: collecting
    the suite must not load torchrec into the other tests' process."""

    _module = None

    def __getattr__(self, name):
        if _LazyModule._module is None:
            _LazyModule._module = require("torchrec", "din_ops.compat.torchrec")
        return getattr(_LazyModule._module, name)


trec = _LazyModule()

B, T = 12, 7
ITEMS, CATS, USERS = 30, 5, (9, 3)
LR, DENSE_LR, LAM, EPS = 0.1, 0.05, 0.5, 1e-8
STEPS = 3
TOL = 2e-5


def _din():
    torch.manual_seed(0)
    return din_ops.models.DIN(ITEMS, CATS, USERS, embed_dim=4, attention_units=(8, 4), mlp_units=(10, 5),
                              mlp_activation="prelu", init_std=0.3)


def _batch(seed, n=B, candidates=1):
    """DIN's inputs with a jagged history (lengths 0..T) and ``candidates`` items per user."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randint(0, T + 1, (n,), generator=g)
    N = int(L.sum())
    shape = (n,) if candidates == 1 else (n, candidates)
    return dict(users=torch.stack([torch.randint(1, USERS[0] + 1, (n,), generator=g),
                                   torch.randint(1, USERS[1] + 1, (n,), generator=g)], 1),
                items=torch.randint(1, ITEMS + 1, shape, generator=g),
                categories=torch.randint(1, CATS + 1, shape, generator=g),
                hist_items=torch.randint(1, ITEMS + 1, (N,), generator=g),
                hist_categories=torch.randint(1, CATS + 1, (N,), generator=g),
                offsets=torch.cat([torch.zeros(1, dtype=torch.int64), L.cumsum(0)]),
                labels=torch.randint(0, 2, shape, generator=g).float())


INPUTS = ("users", "items", "categories", "hist_items", "hist_categories")


def _kjt(b):
    return trec.features(*(b[k] for k in INPUTS), offsets=b["offsets"])


def _rows(b, lo, hi):
    """Users ``lo:hi`` of a batch (their slice of the jagged history)."""
    o = b["offsets"]
    a, z = int(o[lo]), int(o[hi])
    out = {k: b[k][lo:hi] for k in ("users", "items", "categories", "labels")}
    out.update(hist_items=b["hist_items"][a:z], hist_categories=b["hist_categories"][a:z], offsets=o[lo:hi + 1] - a)
    return out


def _batches():
    return [_batch(10 + s) for s in range(STEPS)]


def _frequencies(din):
    # DIN.frequencies reads padded batches: pad the jagged ones
    padded = []
    for b in _batches():
        L = b["offsets"][1:] - b["offsets"][:-1]
        hi, hc = (din_ops.reference.jagged_to_padded(b[k][:, None].float(), b["offsets"])[0][..., 0].long()
                  for k in ("hist_items", "hist_categories"))
        padded.append(dict(users=b["users"], items=b["items"], categories=b["categories"], hist_items=hi,
                           hist_categories=hc, lengths=L))
    return din.frequencies(padded)


def _din_params(din):
    out = {f"embeddings.embeddings.{k}.weight": e.weight.detach().clone() for k, e in din.tables().items()}
    out.update({f"attention.{k}": v.detach().clone() for k, v in din.attention.named_parameters()})
    out.update({f"mlp.{k}": v.detach().clone() for k, v in din.mlp.named_parameters()})
    return out


def _reference(optimizer, online=False):
    """One process of din_ops' DIN on the global batches: logits and loss of each step, parameters after."""
    din = _din()
    tables = [e.weight for e in din.tables().values()]
    dense = [p for p in din.parameters() if all(p is not t for t in tables)]
    groups = [{"params": tables}, {"params": dense, "lr": DENSE_LR}]
    if online:  # counted on the fly: each batch's occurrences are added before its step
        freqs = {e.weight: torch.zeros(e.num_embeddings, dtype=torch.int64) for e in din.tables().values()}
    else:
        freqs = _frequencies(din)
    if optimizer == "sgd":
        opt = din_ops.optim.MBASGD(groups, lr=LR, lam=LAM, frequencies=freqs, padding_idx=0)
    else:
        opt = din_ops.optim.MBAAdagrad(groups, lr=LR, lam=LAM, eps=EPS, rowwise=optimizer == "rowwise_adagrad",
                                       frequencies=freqs, padding_idx=0)
    logits, losses = [], []
    for b in _batches():
        out = din(*(b[k] for k in INPUTS), offsets=b["offsets"])
        loss = F.binary_cross_entropy_with_logits(out, b["labels"])
        if online:
            for e, ids in _table_ids(din, b):
                freqs[e.weight] += din_ops.count_frequencies(ids, e.num_embeddings, padding_idx=0)
        with torch.no_grad():  # the loss MBA minimizes (the optimizer adds its gradient itself)
            penalty = sum(din_ops.mba_penalty(e.weight, ids, freqs[e.weight], LAM, padding_idx=0)
                          for e, ids in _table_ids(din, b))
        opt.zero_grad()
        loss.backward()
        opt.step()
        logits.append(out.detach())
        losses.append(float(loss.detach()) + float(penalty))
    return logits, losses, _din_params(din), din, opt


def _table_ids(din, b):
    """(table, the batch's ids of it) for each of DIN's tables."""
    out = [(e, b["users"][:, i]) for i, e in enumerate(din.user_embeddings)]
    out.append((din.item_embedding, torch.cat([b["items"].reshape(-1), b["hist_items"]])))
    out.append((din.category_embedding, torch.cat([b["categories"].reshape(-1), b["hist_categories"]])))
    return out


def _close(got, want, what):
    got, want = got.detach(), want.detach()
    err = float((got - want).abs().max()) if got.numel() else 0.0
    assert err <= TOL * max(1.0, float(want.abs().max())), f"{what}: {err:.3g}"


# --- the model ----------------------------------------------------------------------------------------
def test_same_seed_same_parameters_as_din():
    din = _din()
    torch.manual_seed(0)
    model = trec.TorchRecDIN(ITEMS, CATS, USERS, embed_dim=4, attention_units=(8, 4), mlp_units=(10, 5),
                             mlp_activation="prelu", init_std=0.3)
    got = dict(model.named_parameters())
    for name, want in _din_params(din).items():
        assert torch.equal(got[name], want), name


@pytest.mark.parametrize("candidates", [1, 3])
def test_logits_equal_din(candidates):
    din = _din()
    model = trec.TorchRecDIN.from_din(din)
    b = _batch(3, candidates=candidates)
    got = model(_kjt(b))
    assert got.shape == (B, candidates)
    if candidates == 1:
        want = din(*(b[k] for k in INPUTS), offsets=b["offsets"])[:, None]
    else:  # DIN on each user's row repeated for each candidate
        C = candidates
        L = b["offsets"][1:] - b["offsets"][:-1]
        rep = torch.arange(B).repeat_interleave(C)
        hist = [torch.cat([b[k][int(b["offsets"][u]):int(b["offsets"][u + 1])] for u in rep.tolist()])
                for k in ("hist_items", "hist_categories")]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), L[rep].cumsum(0)])
        want = din(b["users"][rep], b["items"].reshape(-1), b["categories"].reshape(-1), *hist,
                   offsets=offsets).view(B, C)
    _close(got, want, "logits")
    got.sum().backward()  # the gradient reaches the tables and the unit
    assert model.embeddings.embeddings["item"].weight.grad.abs().max() > 0
    assert model.attention.layers[0].weight.grad.abs().max() > 0


def test_mba_penalty_equals_din_ops_mba_penalty():
    """(lam / 2) sum over the distinct ids of ||w_j||^2 / max(n_j, 1), the padding id left out."""
    din = _din()
    model = trec.TorchRecDIN.from_din(din)
    b = _batch(4)
    b["hist_items"][:3] = 0  # padding ids are not regularized
    freqs = _frequencies(din)
    freqs[din.item_embedding.weight][b["items"][0]] = 0  # n_j == 0 counts as 1
    mba = trec.MBA(model, LAM, frequencies={k: freqs[e.weight] for k, e in din.tables().items()})
    _, penalty = model(_kjt(b), mba=mba)
    want = sum(float(din_ops.mba_penalty(e.weight.detach(), ids, freqs[e.weight], LAM, padding_idx=0))
               for e, ids in _table_ids(din, b))
    assert abs(float(penalty.detach()) - want) <= 1e-6 * want


@pytest.mark.parametrize("optimizer,online", [("sgd", False), ("adagrad", False), ("adagrad", True)])
def test_unfused_mba_equals_din_ops_optimizer(optimizer, online):
    """The penalty + a torch optimizer on the unsharded tables == din_ops.optim.MBA* on DIN."""
    want_logits, want_losses, want, _, _ = _reference(optimizer, online=online)
    din = _din()
    model = trec.TorchRecDIN.from_din(din)
    mba = trec.MBA(model, LAM, frequencies=None if online else
                   {k: v for k, v in zip(din.tables(), _frequencies(din).values())})
    tables = [p for n, p in model.named_parameters() if n.startswith("embeddings.")]
    groups = [{"params": tables}, {"params": trec.dense_parameters(model), "lr": DENSE_LR}]
    opt = (torch.optim.SGD(groups, lr=LR) if optimizer == "sgd" else torch.optim.Adagrad(groups, lr=LR, eps=EPS))
    for step, b in enumerate(_batches()):
        logits, penalty = model(_kjt(b), mba=mba)
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], b["labels"])
        opt.zero_grad()
        (loss + penalty).backward()
        opt.step()
        _close(logits[:, 0].detach(), want_logits[step], f"logits at step {step}")
        assert abs(float((loss + penalty).detach()) - want_losses[step]) <= TOL * max(1.0, want_losses[step])
    got = dict(model.named_parameters())
    for name, w in want.items():
        _close(got[name].detach(), w, name)


# --- DistributedModelParallel -------------------------------------------------------------------------
# (sharding, fused optimizer, MBA frequencies counted on the fly)
# (ddp: the unfused tables replicated, torch.optim.Adagrad)
CONFIGS = [("row_wise", "rowwise_adagrad", False), ("table_wise", "rowwise_adagrad", False), ("row_wise", "sgd", False),
           ("table_wise", "adagrad", True), ("ddp", "adagrad", True)]


def _train_sharded(rank, world, sharding, optimizer, online):
    din = _din()
    model = trec.TorchRecDIN.from_din(din)
    freqs = None if online else {k: v for k, v in zip(din.tables(), _frequencies(din).values())}
    mba = trec.MBA(model, LAM, frequencies=freqs)
    if sharding == "ddp":  # unfused: replicated nn.Embedding tables, DDP averages their dense gradients
        dmp = torch.nn.parallel.DistributedDataParallel(model)
        groups = [{"params": [p for n, p in model.named_parameters() if trec._is_table(n)]},
                  {"params": trec.dense_parameters(model), "lr": DENSE_LR}]
        opt = torch.optim.Adagrad(groups, lr=LR, eps=EPS)
    else:
        dmp = trec.shard(model, sharding, optimizer=optimizer, lr=LR, eps=EPS)
        dense = trec.dense_parameters(dmp)
        opt = (torch.optim.SGD(dense, lr=DENSE_LR) if optimizer == "sgd"
               else torch.optim.Adagrad(dense, lr=DENSE_LR, eps=EPS))
    logits, losses = [], []
    for b in _batches():
        part = _rows(b, rank * B // world, (rank + 1) * B // world)
        out, penalty = dmp(_kjt(part), mba=mba)
        loss = F.binary_cross_entropy_with_logits(out[:, 0], part["labels"]) + penalty
        opt.zero_grad()
        loss.backward()  # the fused optimizer steps the tables here
        opt.step()
        logits.append(out[:, 0].detach())
        losses.append(float(loss.detach()))
    tables = {}
    for name, v in dmp.state_dict().items():
        if hasattr(v, "local_shards"):
            tables[name] = [(s.metadata.shard_offsets[0], s.tensor.clone()) for s in v.local_shards()]
        elif sharding == "ddp" and trec._is_table(name[len("module."):]):
            tables[name[len("module."):]] = [(0, v.clone())]
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if not trec._is_table(n)}
    return dict(logits=logits, losses=losses, tables=tables, dense=dense, memory=trec.table_bytes(dmp))


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {c: _train_sharded(rank, world, *c) for c in CONFIGS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _assemble(parts, name, like):
    out = torch.full_like(like, float("nan"))
    for p in parts:
        for offset, t in p["tables"].get(name, []):
            out[offset:offset + t.shape[0]] = t
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_sharded_training_equals_single_process(tmp_path, world):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    total = {}
    for sharding, optimizer, online in CONFIGS:
        what = f"{world} process(es), {sharding}, {optimizer}{', online counts' if online else ''}"
        want_logits, want_losses, want, din, _ = _reference(optimizer, online=online)
        runs = [p[(sharding, optimizer, online)] for p in parts]
        for step in range(STEPS):
            _close(torch.cat([r["logits"][step] for r in runs]), want_logits[step], f"{what}: logits at step {step}")
            # each process' loss: its mean BCE + W x its share of the penalty; they add up to W x the loss
            got = sum(r["losses"][step] for r in runs) / world
            assert abs(got - want_losses[step]) <= TOL * max(1.0, want_losses[step]), f"{what}: loss at step {step}"
        for name, w in want.items():
            if name.startswith("embeddings."):
                got = _assemble(runs, name, w)
            else:
                got = runs[0]["dense"][name]
                for r in runs[1:]:  # DDP keeps the dense parameters replicated
                    assert torch.equal(r["dense"][name], got), f"{what}: {name} differs between processes"
            _close(got, w, f"{what}: {name}")
        if sharding != "ddp" and not online:
            total[sharding] = [r["memory"]["weights"] for r in runs]
    rows = sum(e.num_embeddings for e in _din().tables().values())
    full = rows * 4 * 4  # fp32, embed_dim 4
    if world == 1:
        assert total["row_wise"] == [full]
    else:  # row-wise: each process holds its half of every table (rows rounded up per table)
        assert sum(total["row_wise"]) == full and max(total["row_wise"]) <= full // 2 + 4 * 4 * len(_din().tables())
        assert sum(total["table_wise"]) == full and min(total["table_wise"]) > 0


def test_example_runs_under_torchrun(tmp_path):
    """examples/train_din_torchrec.py under torchrun (2 gloo processes, row-wise) on a slice of MovieLens-100K."""
    require("recbole", "recbole")  # the data set ships inside the recbole wheel
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "ml100k_torchrec.md"
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(root, "examples", "train_din_torchrec.py"), "--models", "din_mba", "--epochs", "1",
           "--max-train", "2048", "--max-test", "1024", "--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = out.read_text()
    assert "| DIN + MBA | TorchRecDIN | 2 | row_wise |" in table
    assert (tmp_path / "ml100k_torchrec.json").exists()


def test_din_ops_works_without_torchrec():
    """Nothing in din_ops but din_ops.compat.torchrec needs torchrec; that one says how to install it."""
    code = "\n".join([
        "import sys",
        "sys.modules['torchrec'] = None; sys.modules['fbgemm_gpu'] = None  # as if not installed",
        "import torch, din_ops, din_ops.compat, din_ops.models, din_ops.optim",
        "m = din_ops.models.DIN(10, 3, (4,), embed_dim=4)",
        "m(torch.tensor([[1]]), torch.tensor([2]), torch.tensor([1]), torch.tensor([[3, 4]]), torch.tensor([[1, 2]]))",
        "try:",
        "    import din_ops.compat.torchrec",
        "except ImportError as e:",
        "    assert 'requirements-torchrec.txt' in str(e), e",
        "else:",
        "    raise AssertionError('din_ops.compat.torchrec imported without torchrec')",
    ])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.xfail(strict=True, reason="fbgemm-gpu-cpu 1.8.0: the dense TBE on CPU pools sequence lookups")
def test_dense_kernel_returns_rows_on_cpu():
    """Why ``shard`` offers the fused kernel only: TorchRec's ``dense`` compute kernel for sequence
    tables is FBGEMM's ``DenseTableBatchedEmbeddingBagsCodegen`` with ``PoolingMode.NONE``, which on
    CPU returns pooled ``[B, total_D]`` instead of one row per id, so ``DistributedModelParallel``
    fails in the output all-to-all. When this passes (strict xfail), the dense kernel can be added."""
    trec.TorchRecDIN  # installs torchrec when missing
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen

    tbe = DenseTableBatchedEmbeddingBagsCodegen([(10, 4)], pooling_mode=PoolingMode.NONE, use_cpu=True)
    out = tbe(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3]))
    assert out.shape == (3, 4)


def test_bad_features_name_the_key():
    model = trec.TorchRecDIN.from_din(_din())
    b = _batch(5)
    bad = dict(b, hist_items=b["hist_items"].clone())
    bad["hist_items"][0] = ITEMS + 1
    with pytest.raises(ValueError, match=r"features\['hist_item'\] must lie in \[0, 31\)"):
        model(_kjt(bad))
    kjt = _kjt(b)
    from torchrec import KeyedJaggedTensor

    partial = KeyedJaggedTensor.from_lengths_sync(keys=["item"], values=b["items"],
                                                  lengths=torch.ones(B, dtype=torch.int64))
    with pytest.raises(ValueError, match="lacks the keys"):
        model(partial)
    with pytest.raises(TypeError, match="KeyedJaggedTensor"):
        model(kjt.to_dict())
