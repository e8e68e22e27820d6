"""Serving DIN: torch.export of ``DIN.serving()`` and AOTInductor packages, against eager ``DIN.score``.

The packages are made by ``examples/serve_din.py`` (traced at C=8 candidates, T=20 behaviours,
both dynamic) and loaded with ``aot_load_package`` in this process, which has loaded din_ops.
Three AOTInductor compiles in all (module-scoped fixtures): DIN with the paper's sigmoid unit,
DIN with Dice everywhere (eval: running statistics) and softmax weights, and a converted
DeepCTR-Torch DIN. The C++ program running a package is checked in test_cmake.py.
"""
import copy
import importlib.util
import os
import warnings

import pytest
import torch

import din_ops  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5  # fp32 logits

# (C, T): the traced shape, the sizes export specializes when traced with them (1), larger ones
SHAPES = [(8, 20), (1, 1), (1, 20), (8, 1), (5, 3), (64, 200)]

VARIANTS = {
    "sigmoid": {},
    "dice_softmax": dict(attention_activation="dice", attention_normalization="softmax", mlp_activation="dice"),
}


def serve_example():
    """``examples/serve_din.py`` as a module."""
    spec = importlib.util.spec_from_file_location("serve_din", os.path.join(ROOT, "examples", "serve_din.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SERVE = serve_example()


def _warm_running_stats(model, steps=3, B=32, T=20):
    """A few training-mode batches so the Dice running statistics are not the initial 0 / 1."""
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            users = torch.stack([torch.randint(1, e.num_embeddings, (B,), generator=g)
                                 for e in model.user_embeddings], 1)
            items = torch.randint(1, model.item_embedding.num_embeddings, (B,), generator=g)
            cats = torch.randint(1, model.category_embedding.num_embeddings, (B,), generator=g)
            hist = torch.randint(1, model.item_embedding.num_embeddings, (B, T), generator=g)
            hist_c = torch.randint(1, model.category_embedding.num_embeddings, (B, T), generator=g)
            model(users, items, cats, hist, hist_c, torch.randint(1, T + 1, (B,), generator=g))
    model.eval()


def _requests(model, C, T):
    """The example's request, and random ones with an empty and a full history."""
    out = [SERVE.model_request(model, C, T)]
    g = torch.Generator().manual_seed(C * 1000 + T)
    users = out[0][0]
    for length in (0, T):
        out.append((users, torch.randint(1, model.item_embedding.num_embeddings, (C,), generator=g),
                    torch.randint(1, model.category_embedding.num_embeddings, (C,), generator=g),
                    torch.randint(0, model.item_embedding.num_embeddings, (1, T), generator=g),
                    torch.randint(0, model.category_embedding.num_embeddings, (1, T), generator=g),
                    torch.tensor([length])))
    return out


def _assert_close(got, want, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"{what}: max |diff| = {diff:.3g}"


@pytest.fixture(scope="module", params=list(VARIANTS))
def served(request, tmp_path_factory):
    """(model, exported program, loaded package) of one DIN variant."""
    model = SERVE.build_model(**VARIANTS[request.param])
    if "dice" in request.param:
        _warm_running_stats(model)
        assert model.attention.dice[0].running_var.ne(1).any()
    ep = SERVE.export(model)
    path = SERVE.package(model, str(tmp_path_factory.mktemp("serving") / f"{request.param}.pt2"), ep)
    return model, ep, torch._inductor.aoti_load_package(path)


@pytest.mark.parametrize("C,T", SHAPES)
def test_package_matches_eager(served, C, T):
    model, _, runner = served
    with torch.no_grad():
        for i, req in enumerate(_requests(model, C, T)):
            _assert_close(runner(*req), model.score(*req), f"request {i} (C={C}, T={T})")


def test_export_matches_eager(served):
    model, ep, _ = served
    # the fused op is in the graph, with one query row [1, C, D] for the whole history
    ops = [n for n in ep.graph.nodes if n.target is torch.ops.din_ops.attention_pooling.default]
    assert len(ops) == 1
    q = ops[0].args[0].meta["val"]
    assert q.dim() == 3 and q.shape[0] == 1 and isinstance(q.shape[1], torch.SymInt)
    module = ep.module()
    with torch.no_grad():
        for C, T in SHAPES:
            for i, req in enumerate(_requests(model, C, T)):
                _assert_close(module(*req), model.score(*req), f"exported, request {i} (C={C}, T={T})")


def test_package_metadata(served):
    model, _, runner = served
    meta = runner.get_metadata()
    assert meta["num_items"] == str(SERVE.NUM_ITEMS) and meta["num_categories"] == str(SERVE.NUM_CATEGORIES)
    assert meta["user_fields"] == ",".join(map(str, SERVE.USER_FIELDS))


# --- a converted DeepCTR-Torch DIN ---------------------------------------------------------------
DC_T = 8  # DeepCTR-Torch's history length is fixed by the feature columns; the batch is dynamic


def _deepctr():
    try:
        from compat_libs import require

        require("deepctr_torch", "deepctr_torch")
        from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
        from deepctr_torch.models import DIN
    except Exception as e:  # no network to install it, etc.
        pytest.skip(f"DeepCTR-Torch unavailable: {e}")
    return SparseFeat, VarLenSparseFeat, DIN


def _deepctr_input(model, B, seed):
    g = torch.Generator().manual_seed(seed)
    L = torch.randint(1, DC_T + 1, (B,), generator=g)
    pad = torch.arange(DC_T) < L[:, None]
    cols = {"user": torch.randint(0, 5, (B,), generator=g), "item_id": torch.randint(1, 12, (B,), generator=g),
            "cate_id": torch.randint(1, 6, (B,), generator=g),
            "hist_item_id": torch.randint(1, 12, (B, DC_T), generator=g) * pad,
            "hist_cate_id": torch.randint(1, 6, (B, DC_T), generator=g) * pad, "seq_length": L}
    X = torch.zeros(B, max(e for _, e in model.feature_index.values()))
    for name, (s, e) in model.feature_index.items():
        X[:, s:e] = cols[name].reshape(B, -1).float()
    return X


@pytest.fixture(scope="module")
def deepctr_served(tmp_path_factory):
    SparseFeat, VarLenSparseFeat, DIN = _deepctr()
    import din_ops.compat.deepctr_torch as dc

    torch.manual_seed(7)
    cols = [SparseFeat("user", 5, embedding_dim=4), SparseFeat("item_id", 12, embedding_dim=4),
            SparseFeat("cate_id", 6, embedding_dim=4),
            VarLenSparseFeat(SparseFeat("hist_item_id", 12, embedding_dim=4, embedding_name="item_id"), DC_T,
                             length_name="seq_length"),
            VarLenSparseFeat(SparseFeat("hist_cate_id", 6, embedding_dim=4, embedding_name="cate_id"), DC_T,
                             length_name="seq_length")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DIN(cols, ["item_id", "cate_id"], dnn_hidden_units=(16, 8), att_hidden_size=(12, 6),
                    att_activation="Dice", init_std=0.3)
    with torch.no_grad():  # Dice running statistics away from 0 / 1
        for i in range(3):
            model(_deepctr_input(model, 32, i))
    model.eval()
    dc.convert(model)
    X = _deepctr_input(model, 9, 10)
    ep = torch.export.export(model, (X,), dynamic_shapes=({0: torch.export.Dim("B", min=1)},))
    path = torch._inductor.aoti_compile_and_package(
        ep, package_path=str(tmp_path_factory.mktemp("serving") / "deepctr_din.pt2"))
    return model, ep, torch._inductor.aoti_load_package(path)


def test_deepctr_torch_din_export_and_package(deepctr_served):
    model, ep, runner = deepctr_served
    assert any(n.target is torch.ops.din_ops.attention_pooling.default for n in ep.graph.nodes)
    module = ep.module()
    with torch.no_grad():
        for B in (9, 1, 3, 40):  # traced at 9
            X = _deepctr_input(model, B, 100 + B)
            want = model(X)
            _assert_close(module(X), want, f"exported, B={B}")
            _assert_close(runner(X), want, f"package, B={B}")


def test_deepctr_masked_attention_exports():
    """A converted AttentionSequencePoolingLayer(supports_masking=True) exports: under tracing it
    takes the jagged route for any mask (holes included) instead of branching on the mask."""
    _deepctr()
    from deepctr_torch.layers import AttentionSequencePoolingLayer

    import din_ops.compat.deepctr_torch as dc

    torch.manual_seed(5)
    m = AttentionSequencePoolingLayer(att_hidden_units=(8, 4), embedding_dim=4, supports_masking=True).eval()
    c = dc.convert(copy.deepcopy(m)).eval()

    class Masked(torch.nn.Module):
        def __init__(self, unit):
            super().__init__()
            self.unit = unit

        def forward(self, q, k, mask):
            return self.unit(q, k, None, mask=mask)

    def inputs(B, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(B, 1, 4, generator=g), torch.randn(B, 6, 4, generator=g), torch.rand(B, 6, generator=g) > 0.3

    B = torch.export.Dim("B", min=2, max=1024)
    ep = torch.export.export(Masked(c), inputs(5, 0), dynamic_shapes=({0: B}, {0: B}, {0: B}))
    for b in (5, 3, 17):
        q, k, mask = inputs(b, b)
        torch.testing.assert_close(ep.module()(q, k, mask), m(q, k, None, mask=mask), rtol=0, atol=1e-5)
