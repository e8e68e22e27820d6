"""Compiles every din_ops Triton kernel for a CUDA target (no GPU needed) and prints, as JSON, the
integer type of the first offset added to each pointer argument in the kernel's TTIR:
``{"module.kernel": {"arg": ["i64", ...]}}``. Used by tests/test_large_sizes.py; run it without
TRITON_INTERPRET. The launchers run on tiny CPU tensors with the kernel launch replaced by a
recorder, so each kernel is compiled with the arguments and specializations its launcher gives it.

Prints ``{"skip": reason}`` where this Triton cannot compile for the target at all.
"""
import json
import os
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.errors import CompilationError
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)
_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
       torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}


def record_launches():
    launches = []
    JITFunction.run = lambda self, *args, grid, warmup=False, **kw: launches.append((self, args, kw))
    from din_ops.triton import attention_pooling as tap, dice as tdice, mba as tmba

    bf, D, C = torch.bfloat16, 8, 2
    dims = [4 * D, 16, 8, 1]
    W = [torch.randn(o, i).to(bf) for i, o in zip(dims[:-1], dims[1:])]
    b = [torch.randn(o).to(bf) for o in dims[1:]]
    jk, offs = torch.randn(10, D).to(bf), torch.tensor([0, 3, 3, 10])
    pk, lens = torch.randn(3, 5, D).to(bf), torch.tensor([1, 5, 0])
    for q in (torch.randn(3, D).to(bf), torch.randn(3, C, D).to(bf)):
        for keys, ln, o, norm in ((jk, None, offs, "softmax"), (pk, lens, None, "none"), (pk, None, None, "softmax")):
            args = (q, keys, ln, o, W, b, [], [], [], [], [], "sigmoid", norm, 1.0, 1e-8)
            out, attn = tap.attention_pooling(*args)
            tap.attention_pooling_backward(out, attn, attn, *args)
    alpha, stat = [torch.rand(16).to(bf)], [torch.zeros(16)]
    q = torch.randn(3, C, D).to(bf)
    dice_args = (q, jk, None, offs, W[:2], b[:2], alpha, stat, stat, [], [], "dice", 1e-5)
    tap.attention_pooling_stats(*dice_args)
    z8 = torch.zeros(8)
    tap.attention_pooling_stats_backward(z8, z8, z8, *dice_args)
    x, a4 = torch.randn(3, 5, 4).to(bf), torch.rand(4)
    for ln in (lens, None):
        tdice.dice(x, ln, a4, a4, a4, None, None, True, 1e-5)
        tdice.dice_backward(x, x, ln, a4, a4, a4, a4, a4, True, 1e-5)
    w, idx, freq = torch.randn(50, 4).to(bf), torch.tensor([1] * 300 + [3, 3, 7]), torch.ones(50)
    for opt, st in (("sgd", None), ("adagrad", torch.zeros(50, 4)), ("adagrad_rowwise", torch.zeros(50))):
        tmba.mba_sparse_update_triton(w, idx, torch.randn(idx.numel(), 4).to(bf), freq, st, 0.1, 0.1, opt,
                                      None, 1e-8)
    tmba.mba_penalty_triton(w, idx, freq, 0.1, None)
    tmba.mba_penalty_backward_triton(torch.ones(()), w, idx, freq, 0.1, None)
    return launches


def source(fn, args, kwargs):
    sig, const = {}, {}
    for i, p in enumerate(fn.params):
        v = kwargs[p.name] if p.name in kwargs else args[i]
        if p.is_constexpr:
            sig[p.name], const[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _TY[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        else:
            sig[p.name] = "fp32"
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    return ASTSource(fn, signature=sig, constexprs=const), opts


_DEF = re.compile(r"^\s*(%[\w.#]+)\s*=\s*([\w.]+)\s+(.*)$")
_ARG = re.compile(r"%(\w+): !tt\.ptr<")
_OFF = re.compile(r",\s*(?:tensor<[\dx]*x)?(i\d+)")


def first_offsets(ttir):
    """{pointer argument: {type of the offset of each first tt.addptr on it}}; later addptrs of a
    chain (``base + row_offset + in_tile``) add in-tile offsets, which may stay i32."""
    root = {"%" + m.group(1): (m.group(1), False) for m in _ARG.finditer(ttir)}
    found = {}
    for line in ttir.splitlines():
        m = _DEF.match(line)
        if not m:
            continue
        res, op, rest = m.groups()
        operands = re.findall(r"%[\w.#]+", rest.split(":")[0])
        if not operands or operands[0] not in root:
            continue
        arg, chained = root[operands[0]]
        if op == "tt.addptr":
            if not chained:
                t = _OFF.search(rest.split(":", 1)[1])
                found.setdefault(arg, set()).add(t.group(1) if t else "?")
            root[res] = (arg, True)
        elif op in ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape"):
            root[res] = (arg, chained)
    return found


def main():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET")
    launches = record_launches()
    result, seen = {}, set()
    for fn, args, kwargs in launches:
        src, opts = source(fn, args, kwargs)
        if src.hash() in seen:
            continue
        seen.add(src.hash())
        try:
            compiled = triton.compile(src, target=TARGET, options=opts)
        except CompilationError:
            raise
        except Exception as e:  # no backend or tools for the target in this Triton
            print(json.dumps({"skip": f"{type(e).__name__}: {e}"[:500]}))
            return
        name = f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
        for arg, types in first_offsets(compiled.asm["ttir"]).items():
            result.setdefault(name, {}).setdefault(arg, set()).update(types)
    print(json.dumps({k: {a: sorted(t) for a, t in v.items()} for k, v in result.items()}))


if __name__ == "__main__":
    main()
