"""Serving DIN with AOTInductor: one user against C candidate ads, from Python or from C++.

``DIN.serving()`` (its forward is ``DIN.score``) is exported with ``torch.export`` with a dynamic
number of candidates C and history length T, compiled by AOTInductor into one ``.pt2`` package
(code and weights), loaded back and checked against the eager model at several C and T::

    python setup.py build_ext --inplace
    python examples/serve_din.py --out /tmp/din.pt2              # a seeded random model
    python examples/serve_din.py --out /tmp/din.pt2 --state-dict din.pt --candidates 100 --history 50

``--state-dict`` takes ``DIN(...).state_dict()`` saved with ``torch.save``; the table and layer
sizes are read from it, the activations come from the flags (DIN's defaults).

The package also records the vocabulary sizes (its metadata), so the C++ program
(``examples/serve_din.cpp``, no Python) builds the same deterministic request as :func:`request`
and prints one logit per line::

    cmake -S . -B build -DCMAKE_PREFIX_PATH="$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
    cmake --build build -j2 --target din_ops_serve
    build/din_ops_serve /tmp/din.pt2 50 30                       # C = 50 candidates, T = 30 behaviours

The package calls din_ops' operators, so the process that runs it must have loaded din_ops
(Python: ``import din_ops``; C++: link ``libdin_ops.so``, CMake target ``din_ops``); without it
loading fails with "Could not find schema for din_ops::attention_pooling".
"""
import argparse

import torch

import din_ops  # noqa: F401  (registers the operators the package calls)
from din_ops.models import DIN

NUM_ITEMS, NUM_CATEGORIES, USER_FIELDS, EMBED_DIM = 1000, 100, (50, 3), 16
TRACE_C, TRACE_T = 8, 20  # export specializes sizes 0 and 1, so trace with larger ones


def build_model(state_dict=None, seed=0, **kwargs):
    """A din_ops DIN in eval mode: seeded random weights, or the sizes and weights of ``state_dict``."""
    torch.manual_seed(seed)
    # sparse gradients only matter for training; a dense table's lookup is compiled by Inductor,
    # a sparse one's (embedding(..., sparse=True)) runs through AOTInductor's proxy executor
    kwargs.setdefault("sparse", False)
    if state_dict is None:
        model = DIN(NUM_ITEMS, NUM_CATEGORIES, USER_FIELDS, embed_dim=EMBED_DIM, **kwargs)
    else:
        def rows(prefix):  # output sizes of the layers prefix.0, prefix.1, ...
            out = []
            while f"{prefix}.{len(out)}.weight" in state_dict:
                out.append(state_dict[f"{prefix}.{len(out)}.weight"].shape[0])
            return out

        items = state_dict["item_embedding.weight"]
        model = DIN(items.shape[0] - 1, state_dict["category_embedding.weight"].shape[0] - 1,
                    [n - 1 for n in rows("user_embeddings")], embed_dim=items.shape[1],
                    attention_units=rows("attention.layers"), mlp_units=rows("mlp.layers"),
                    pooling="attention" if "attention.output.weight" in state_dict else "sum", **kwargs)
        model.load_state_dict(state_dict)
    return model.eval()


def request(C, T, num_items=NUM_ITEMS, num_categories=NUM_CATEGORIES, user_fields=USER_FIELDS):
    """The request ``serve_din.cpp`` builds for C candidates and T behaviours (ids from 1)."""
    c, t = torch.arange(C), torch.arange(T)
    users = torch.tensor([[1 + f % n for f, n in enumerate(user_fields)]], dtype=torch.int64).reshape(1, -1)
    return (users, 1 + (7 * c) % num_items, 1 + (3 * c) % num_categories,
            (1 + (5 * t + 2) % num_items)[None], (1 + (2 * t + 1) % num_categories)[None],
            torch.tensor([T - T // 3]))


def model_request(model, C, T):
    """:func:`request` with the vocabulary sizes of ``model``."""
    return request(C, T, model.item_embedding.num_embeddings - 1, model.category_embedding.num_embeddings - 1,
                   [e.num_embeddings - 1 for e in model.user_embeddings])


def export(model, C=TRACE_C, T=TRACE_T):
    """``torch.export`` of ``model.serving()`` with dynamic C (candidates) and T (history), both >= 1."""
    dim_c, dim_t = torch.export.Dim("C", min=1), torch.export.Dim("T", min=1)
    dynamic = (None, {0: dim_c}, {0: dim_c}, {1: dim_t}, {1: dim_t}, None)
    return torch.export.export(model.serving(), model_request(model, C, T), dynamic_shapes=dynamic)


def package(model, path, ep=None):
    """Compiles and packages the exported model into ``path``; its vocabulary sizes go into the metadata."""
    meta = {"num_items": str(model.item_embedding.num_embeddings - 1),
            "num_categories": str(model.category_embedding.num_embeddings - 1),
            "user_fields": ",".join(str(e.num_embeddings - 1) for e in model.user_embeddings)}
    return torch._inductor.aoti_compile_and_package(ep if ep is not None else export(model), package_path=path,
                                                    inductor_configs={"aot_inductor.metadata": meta})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="din.pt2", help="package path (.pt2)")
    p.add_argument("--candidates", type=int, default=50, help="C of the request scored")
    p.add_argument("--history", type=int, default=30, help="T of the request scored")
    p.add_argument("--state-dict", help="torch.save'd DIN state_dict (default: a seeded random model)")
    p.add_argument("--attention-activation", default="sigmoid")
    p.add_argument("--attention-normalization", default="none")
    p.add_argument("--mlp-activation", default="prelu")
    args = p.parse_args()

    sd = torch.load(args.state_dict, map_location="cpu") if args.state_dict else None
    model = build_model(sd, attention_activation=args.attention_activation,
                        attention_normalization=args.attention_normalization, mlp_activation=args.mlp_activation)
    path = package(model, args.out)
    runner = torch._inductor.aoti_load_package(path)
    print(f"package: {path} (traced at C={TRACE_C}, T={TRACE_T})")

    with torch.no_grad():
        for C, T in [(args.candidates, args.history), (TRACE_C, TRACE_T), (1, 1), (3, 200)]:
            req = model_request(model, C, T)
            logits = runner(*req)
            diff = (logits - model.score(*req)).abs().max().item()
            if (C, T) == (args.candidates, args.history):
                print(f"logits (C={C}, T={T}):", " ".join(f"{x:.6f}" for x in logits.tolist()))
            print(f"C={C:4d} T={T:4d}: max |package - eager| = {diff:.3g}")
    print(f"C++: build/din_ops_serve {path} {args.candidates} {args.history}")


if __name__ == "__main__":
    main()
