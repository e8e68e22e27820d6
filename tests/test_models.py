"""din_ops.models: the fused DIN equals the eager one (same parameters, outputs, gradients, training).

float64 throughout, tolerance 1e-10 relative to the largest value. Also the MovieLens-100K data
module and metrics of the example.
"""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import din_ops
from din_ops import models
from din_ops.reference import valid_mask

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import ml100k  # noqa: E402
import train_din_ml100k as example  # noqa: E402

ITEMS, CATS, FIELDS = 40, 6, (11, 2, 7)
INPUTS = ("users", "items", "categories", "hist_items", "hist_categories", "lengths")


def _close(a, b, what, tol=1e-10):
    scale = max(1.0, float(b.detach().abs().max()))
    err = float((a.detach() - b.detach()).abs().max())
    assert err <= tol * scale, f"{what}: {err:.3g}"


def _batch(B=9, T=8, seed=0, min_len=1):
    g = torch.Generator().manual_seed(seed)
    L = torch.randint(min_len, T + 1, (B,), generator=g)
    L[0] = T
    valid = valid_mask(L, B, T)
    return dict(users=torch.stack([torch.randint(1, n + 1, (B,), generator=g) for n in FIELDS], 1),
                items=torch.randint(1, ITEMS + 1, (B,), generator=g),
                categories=torch.randint(1, CATS + 1, (B,), generator=g),
                hist_items=torch.randint(1, ITEMS + 1, (B, T), generator=g) * valid,
                hist_categories=torch.randint(1, CATS + 1, (B, T), generator=g) * valid,
                lengths=L, labels=torch.randint(0, 2, (B,), generator=g).double())


def _pair(cls=models.DIN, **kw):
    out = []
    for backend in ("eager", "din_ops"):
        torch.manual_seed(3)
        out.append(cls(ITEMS, CATS, FIELDS, embed_dim=4, attention_units=(9, 5), mlp_units=(12, 6), init_std=0.5,
                       backend=backend, **kw).double())
    return out


def _grads(model):
    return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad) for n, p in model.named_parameters()
            if p.grad is not None}


CONFIGS = [
    dict(attention_activation="sigmoid", mlp_activation="prelu"),
    dict(attention_activation="sigmoid", mlp_activation="dice"),
    dict(attention_activation="dice", attention_normalization="softmax", mlp_activation="dice"),
    dict(attention_activation="prelu", attention_normalization="softmax", mlp_activation="relu"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(c.values()))
def test_din_backends_agree(cfg):
    eager, fused = _pair(**cfg)
    assert type(fused.attention) is din_ops.nn.AttentionPooling
    assert type(eager.attention) is models.EagerAttentionPooling
    sd_e, sd_f = eager.state_dict(), fused.state_dict()
    assert list(sd_e) == list(sd_f) and all(torch.equal(sd_e[k], sd_f[k]) for k in sd_e)
    for step in range(2):  # the second step sees the running statistics the first one updated
        b = _batch(seed=step)
        ye, yf = eager(*(b[k] for k in INPUTS)), fused(*(b[k] for k in INPUTS))
        _close(yf, ye, f"logits step {step}")
        ye.pow(2).sum().backward()
        yf.pow(2).sum().backward()
        ge, gf = _grads(eager), _grads(fused)
        assert set(ge) == set(gf)
        for n in ge:
            _close(gf[n], ge[n], f"grad {n} step {step}")
        eager.zero_grad(), fused.zero_grad()
    for (n, a), (_, b) in zip(fused.named_buffers(), eager.named_buffers()):
        _close(a, b, f"buffer {n}")
    eager.eval(), fused.eval()
    b = _batch(seed=5)
    _close(fused.predict(*(b[k] for k in INPUTS)), eager.predict(*(b[k] for k in INPUTS)), "eval")


@pytest.mark.parametrize("backend", ["eager", "din_ops"])
@pytest.mark.parametrize("cls", [models.DIN, models.BaseModel])
def test_jagged_equals_padded(backend, cls):
    torch.manual_seed(4)
    m = cls(ITEMS, CATS, FIELDS, embed_dim=4, attention_units=(6,), mlp_units=(8,), backend=backend,
            init_std=0.5).double().eval()
    b = _batch(seed=6)
    mask = valid_mask(b["lengths"], *b["hist_items"].shape)
    offsets = F.pad(b["lengths"].cumsum(0), (1, 0))
    y_pad = m(*(b[k] for k in INPUTS))
    y_jag = m(b["users"], b["items"], b["categories"], b["hist_items"][mask], b["hist_categories"][mask],
              offsets=offsets)
    _close(y_jag, y_pad, "jagged vs padded")


def test_base_model_is_sum_pooling():
    eager, fused = _pair(models.BaseModel)
    assert fused.attention is None
    b = _batch(seed=7)
    keys = torch.cat([fused.item_embedding(b["hist_items"]), fused.category_embedding(b["hist_categories"])], -1)
    interest = (keys * valid_mask(b["lengths"], *b["hist_items"].shape)[..., None]).sum(1)
    query = torch.cat([fused.item_embedding(b["items"]), fused.category_embedding(b["categories"])], -1)
    users = [e(b["users"][:, i]) for i, e in enumerate(fused.user_embeddings)]
    want = fused.mlp(torch.cat(users + [query, interest], -1))
    _close(fused(*(b[k] for k in INPUTS)), want, "sum pooling")
    _close(eager(*(b[k] for k in INPUTS)), want, "eager sum pooling")


def test_padding_content_is_ignored():
    _, m = _pair()
    b = _batch(seed=8, min_len=2)
    y = m(*(b[k] for k in INPUTS))
    pad = ~valid_mask(b["lengths"], *b["hist_items"].shape)
    b["hist_items"][pad] = 7
    b["hist_categories"][pad] = 3
    _close(m(*(b[k] for k in INPUTS)), y, "padding content")


def test_frequencies():
    _, m = _pair()
    batches = [_batch(seed=s) for s in range(3)]
    n = m.frequencies(batches)
    items = torch.cat([torch.cat([b["items"], b["hist_items"][valid_mask(b["lengths"], *b["hist_items"].shape)]])
                       for b in batches])
    want = torch.bincount(items, minlength=ITEMS + 1)
    want[0] = 0
    assert torch.equal(n[m.item_embedding.weight], want)
    users0 = torch.cat([b["users"][:, 0] for b in batches])
    assert int(n[m.user_embeddings[0].weight].sum()) == len(users0)


@pytest.mark.parametrize("mba", [False, True])
def test_example_training_backends_agree(mba):
    """The example's eager optimizer (torch.optim.Adagrad, MBA term added to the sparse gradient)
    and din_ops.optim.MBAAdagrad train the same DIN to the same parameters."""
    args = example.parse_args(["--lr", "0.1", "--dense-lr", "0.05", "--mba-lambda", "0.3"])
    eager, fused = _pair(mlp_activation="dice")
    freqs = {}
    for m in (eager, fused):
        freqs[m] = m.frequencies([_batch(seed=s) for s in range(3)]) if mba else None
    opts = {m: example.make_optimizer(m, m.backend, mba, args, freqs[m]) for m in (eager, fused)}
    for step in range(3):
        b = _batch(seed=step)
        for m in (eager, fused):
            loss = F.binary_cross_entropy_with_logits(m(*(b[k] for k in INPUTS)), b["labels"])
            opts[m].zero_grad()
            loss.backward()
            if mba and m.backend == "eager":
                example.mba_gradient_(m, args.mba_lambda, freqs[m])
            opts[m].step()
    for (n, a), (_, b) in zip(fused.state_dict().items(), eager.state_dict().items()):
        _close(a, b, f"{n} after 3 steps", tol=1e-9)
    assert not torch.equal(fused.item_embedding.weight, _pair()[1].item_embedding.weight)


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        models.DIN(5, 2, backend="cuda")
    with pytest.raises(ValueError, match="pooling"):
        models.DIN(5, 2, pooling="max")
    with pytest.raises(ValueError, match="mlp_activation"):
        models.DIN(5, 2, mlp_activation="tanh")
    with pytest.raises(ValueError, match="attention_activation"):
        models.DIN(5, 2, attention_activation="tanh")


# --- the example's metrics and data ---------------------------------------------------------------
def _auc_pairs(y, s):
    pos, neg = s[y == 1], s[y == 0]
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


def test_auc_and_gauc():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 1)  # ties on purpose
    assert abs(ml100k.auc(y, s) - _auc_pairs(y, s)) < 1e-12
    users = rng.integers(0, 7, 300)
    want = num = 0.0
    for u in np.unique(users):
        k = users == u
        if 0 < y[k].sum() < k.sum():
            want += k.sum() * _auc_pairs(y[k], s[k])
            num += k.sum()
    assert abs(ml100k.gauc(users, y, s) - want / num) < 1e-12


def test_movielens_100k():
    from compat_libs import require

    require("recbole", "recbole")  # the data set ships inside the recbole wheel
    d = ml100k.load(max_len=20)
    assert (len(d.train), len(d.test)) == (80000, 20000)
    assert d.user_fields == (943, 2, 7, 21) and d.num_items == 1682 and d.num_categories == 19
    tr = d.train
    assert int(tr.lengths.max()) == 20
    assert not tr.hist_items[~valid_mask(tr.lengths, *tr.hist_items.shape)].any()
    # one user's training examples rebuilt from the raw files: the history is the movies the user
    # rated strictly earlier, oldest first, the last 20; ids follow the order of the .user/.item files
    base = ml100k.dataset_dir()

    def rows(name):
        with open(os.path.join(base, name), encoding="utf-8", errors="replace") as f:
            next(f)
            return [line.rstrip("\n").split("\t") for line in f if line.strip()]

    user_id = {r[0]: i + 1 for i, r in enumerate(rows("ml-100k.user"))}
    item_id = {r[0]: i + 1 for i, r in enumerate(rows("ml-100k.item"))}
    u = "42"
    mine = sorted((float(r[3]), item_id[r[1]], float(r[2])) for r in rows("ml-100k.inter") if r[0] == u)
    k = torch.nonzero(tr.users[:, 0] == user_id[u]).flatten()
    assert len(k) > 20
    for j, row in enumerate(k.tolist()):
        ts, item, rating = mine[j]
        hist = [i for t, i, _ in mine if t < ts][-20:]
        assert int(tr.items[row]) == item and float(tr.labels[row]) == float(rating >= 4)
        assert int(tr.lengths[row]) == len(hist)
        assert tr.hist_items[row, :len(hist)].tolist() == hist


def test_example_smoke(tmp_path):
    """The example end to end on a slice of the data: both backends, the table, equal AUCs."""
    from compat_libs import require

    require("recbole", "recbole")
    out = tmp_path / "t.md"
    results = example.main(["--models", "base", "din_dice_mba", "--epochs", "1", "--max-train", "3000",
                            "--max-test", "1500", "--no-progress", "--out", str(out)])
    assert len(results) == 4
    by = {(r["model"], r["backend"]): r for r in results}
    for name in ("base", "din_dice_mba"):
        assert abs(by[(name, "din_ops")]["auc"] - by[(name, "eager")]["auc"]) < 1e-3
    text = out.read_text()
    assert "| DIN + Dice + MBA | din_ops |" in text and "speed-up" in text
