"""MBA optimizers: a checkpoint taken in the middle of training resumes bit-identically.

Each case trains K steps, saves model and optimizer (``torch.save``, read back with
``torch.load(..., weights_only=True)``), builds a fresh model and optimizer, loads both, trains M
more steps and compares every parameter and every optimizer state tensor (values and dtype) with
an uninterrupted run of K + M steps, with ``torch.equal``.
"""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import din_ops
from din_ops import models
from din_ops.optim import MBAAdagrad, MBASGD, embedding_padding
from din_ops.reference import valid_mask

K, M = 3, 4
N1, N2, D, B, L = 13, 9, 4, 6, 5

OPTS = [
    ("sgd", lambda params, **kw: MBASGD(params, lr=0.05, lam=0.3, weight_decay=0.01, **kw)),
    ("adagrad", lambda params, **kw: MBAAdagrad(params, lr=0.1, lam=0.3, weight_decay=0.01,
                                                 initial_accumulator_value=0.1, **kw)),
    ("adagrad_rowwise", lambda params, **kw: MBAAdagrad(params, lr=0.1, lam=0.3, rowwise=True, **kw)),
]


class Net(nn.Module):
    """Two sparse tables (row 0 gets gradient: padding is the optimizer's business) and a dense head."""

    def __init__(self, dtype, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.emb1 = nn.Embedding(N1, D, sparse=True, dtype=dtype)
        self.emb2 = nn.Embedding(N2, D, sparse=True, dtype=dtype)
        self.head = nn.Linear(D, 1, dtype=dtype)

    def forward(self, i1, i2):
        return self.head(self.emb1(i1).mean(1) + self.emb2(i2).mean(1)).squeeze(-1)


def _batches(n):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        i1 = torch.randint(0, N1, (B, L), generator=g)
        i1[0, 0] = 0  # the padding row of emb1 is in every batch
        out.append((i1, torch.randint(0, N2, (B, L), generator=g), torch.randn(B, generator=g)))
    return out


def _counts(batches, col, n):
    return sum(torch.bincount(b[col].reshape(-1), minlength=n) for b in batches)


def _train(net, opt, batches):
    for i1, i2, y in batches:
        opt.zero_grad()
        loss = F.mse_loss(net(i1, i2).float(), y)
        loss.backward()
        opt.step()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_same(net_a, opt_a, net_b, opt_b):
    assert all(bool(p.isfinite().all()) for p in net_a.parameters())
    for (name, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    pa, pb = list(net_a.parameters()), list(net_b.parameters())
    for i, (a, b) in enumerate(zip(pa, pb)):
        sa, sb = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert sorted(sa) == sorted(sb), (i, sorted(sa), sorted(sb))
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, (i, key, sa[key].dtype, sb[key].dtype)
            assert torch.equal(sa[key], sb[key]), (i, key)
        fa, fb = opt_a.frequencies(a), opt_b.frequencies(b)
        assert (fa is None) == (fb is None), i
        if fa is not None:
            assert torch.equal(fa, fb), i


def _make_opt(make, net, mode, freqs, resumed):
    """mode: 'online' counts, 'ctor' frequencies/padding dicts, 'group' per-group settings (left
    out of the resumed optimizer's groups: they must come back from the checkpoint)."""
    e1, e2, dense = net.emb1.weight, net.emb2.weight, list(net.head.parameters())
    if mode == "online":
        return make(net.parameters(), padding_idx={e1: 0})
    if mode == "ctor":
        return make(net.parameters(), frequencies={e1: freqs[0], e2: freqs[1]}, padding_idx={e1: 0})
    if resumed:
        groups = [{"params": [e1]}, {"params": [e2]}, {"params": dense}]
    else:
        groups = [{"params": [e1], "frequencies": freqs[0], "padding_idx": 0},
                  {"params": [e2], "frequencies": {e2: freqs[1]}, "padding_idx": {e2: 2}},
                  {"params": dense, "lr": 0.05}]
    return make(groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["online", "ctor", "group"])
@pytest.mark.parametrize("name,make", OPTS, ids=[o[0] for o in OPTS])
def test_resume_is_bit_identical(name, make, mode, dtype):
    batches = _batches(K + M)
    freqs = (_counts(batches, 0, N1), _counts(batches, 1, N2).to(torch.float32))

    net_a = Net(dtype, seed=1)
    opt_a = _make_opt(make, net_a, mode, freqs, resumed=False)
    _train(net_a, opt_a, batches)

    net_b = Net(dtype, seed=1)
    opt_b = _make_opt(make, net_b, mode, freqs, resumed=False)
    _train(net_b, opt_b, batches[:K])
    ckpt = _roundtrip({"model": net_b.state_dict(), "opt": opt_b.state_dict()})

    net_c = Net(dtype, seed=2)  # other initial values: everything must come from the checkpoint
    opt_c = _make_opt(make, net_c, mode, freqs, resumed=True)
    net_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    _assert_same(net_b, opt_b, net_c, opt_c)
    _train(net_c, opt_c, batches[K:])
    _assert_same(net_a, opt_a, net_c, opt_c)
    if mode == "online":
        assert int(opt_c.state[net_c.emb1.weight]["frequency"][0]) == 0  # padding never counted
    if name != "sgd":
        acc = torch.float32
        assert opt_c.state[net_c.emb1.weight]["sum"].dtype == acc
        assert opt_c.state[net_c.head.weight]["sum"].dtype == acc


@pytest.mark.parametrize("name,make", OPTS, ids=[o[0] for o in OPTS])
def test_load_in_memory_does_not_share_state(name, make):
    batches = _batches(K + M)
    net_a = Net(torch.float32, seed=1)
    opt_a = make(net_a.parameters())
    _train(net_a, opt_a, batches[:K])
    net_b = Net(torch.float32, seed=1)
    net_b.load_state_dict(net_a.state_dict())
    opt_b = make(net_b.parameters())
    opt_b.load_state_dict(opt_a.state_dict())  # no save: the dict holds opt_a's live tensors
    before = {k: v.clone() for k, v in opt_a.state[net_a.emb1.weight].items()}
    _train(net_b, opt_b, batches[K:])
    for k, v in opt_a.state[net_a.emb1.weight].items():
        assert torch.equal(v, before[k]), k
    _train(net_a, opt_a, batches[K:])
    _assert_same(net_a, opt_a, net_b, opt_b)


def test_state_dict_has_no_tensor_keys():
    net = Net(torch.float32, seed=1)
    e1, e2 = net.emb1.weight, net.emb2.weight
    opt = MBAAdagrad([{"params": [e1, e2], "frequencies": {e2: torch.ones(N2)}, "padding_idx": {e1: 0}},
                      {"params": list(net.head.parameters())}])
    _train(net, opt, _batches(1))
    sd = opt.state_dict()
    g = sd["param_groups"][0]
    assert g["frequencies"].keys() == {1} and g["padding_idx"] == {0: 0}
    assert all(isinstance(k, int) for k in sd["state"])
    # the live groups keep their parameter keys
    assert next(iter(opt.param_groups[0]["padding_idx"])) is e1


def test_load_rejects_bad_state():
    net = Net(torch.float32, seed=1)
    opt = MBAAdagrad(net.parameters(), lr=0.1, lam=0.1)
    _train(net, opt, _batches(1))
    for key, bad in (("frequency", torch.zeros(N1 + 1, dtype=torch.int64)),
                     ("frequency", torch.zeros(N1, dtype=torch.float32)),
                     ("sum", torch.zeros(N1, D + 1))):
        sd = _roundtrip(opt.state_dict())
        sd["state"][0][key] = bad
        fresh = MBAAdagrad(net.parameters(), lr=0.1, lam=0.1)
        with pytest.raises(ValueError, match=key):
            fresh.load_state_dict(sd)
        assert len(fresh.state) == 0  # nothing half-loaded


# --- DIN end to end ------------------------------------------------------------------------------
ITEMS, CATS, FIELDS, T = 25, 5, (7, 3), 6


def _din_batches(n):
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(n):
        lens = torch.randint(0, T + 1, (B,), generator=g)
        valid = valid_mask(lens, B, T)
        out.append(dict(users=torch.stack([torch.randint(1, f + 1, (B,), generator=g) for f in FIELDS], 1),
                        items=torch.randint(1, ITEMS + 1, (B,), generator=g),
                        categories=torch.randint(1, CATS + 1, (B,), generator=g),
                        hist_items=torch.randint(1, ITEMS + 1, (B, T), generator=g) * valid,
                        hist_categories=torch.randint(1, CATS + 1, (B, T), generator=g) * valid,
                        lengths=lens, labels=torch.randint(0, 2, (B,), generator=g).float()))
    return out


def _din(seed):
    torch.manual_seed(seed)
    return models.DIN(ITEMS, CATS, FIELDS, embed_dim=4, attention_units=(8, 4), attention_activation="dice",
                      mlp_units=(12, 6), mlp_activation="dice", init_std=0.3)


def _din_train(model, opt, batches):
    for b in batches:
        opt.zero_grad()
        logits = model(b["users"], b["items"], b["categories"], b["hist_items"], b["hist_categories"],
                       lengths=b["lengths"])
        F.binary_cross_entropy_with_logits(logits, b["labels"]).backward()
        opt.step()


@pytest.mark.parametrize("given", [False, True], ids=["online", "given"])
@pytest.mark.parametrize("name,make", OPTS, ids=[o[0] for o in OPTS])
def test_din_resume_is_bit_identical(name, make, given):
    batches = _din_batches(K + M)

    def build(seed):
        model = _din(seed)
        kw = dict(padding_idx=embedding_padding(model))
        if given:
            kw["frequencies"] = model.frequencies(batches)
        return model, make(model.parameters(), **kw)

    model_a, opt_a = build(1)
    _din_train(model_a, opt_a, batches)
    model_b, opt_b = build(1)
    _din_train(model_b, opt_b, batches[:K])
    ckpt = _roundtrip({"model": model_b.state_dict(), "opt": opt_b.state_dict()})
    model_c, opt_c = build(2)
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    _din_train(model_c, opt_c, batches[K:])
    _assert_same(model_a, opt_a, model_c, opt_c)
    sparse = [m.weight for m in model_c.modules() if isinstance(m, nn.Embedding)]
    if not given:
        for w in sparse:
            assert opt_c.state[w]["frequency"].dtype == torch.int64
            assert int(opt_c.state[w]["frequency"][0]) == 0  # padding row 0 is not counted
    # the uninterrupted run really moved the tables (a no-op step would pass the comparison)
    assert not torch.equal(model_a.item_embedding.weight, _din(1).item_embedding.weight)
