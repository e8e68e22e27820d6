"""Comparison helpers for the compat tests: outputs, gradients and buffers of two modules."""
import copy

import torch

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def close(a, b, dtype, what):
    scale = max(1.0, float(b.detach().abs().max())) if b.numel() else 1.0
    err = float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def randomize(module, std=0.5):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def compare(orig, conv, inputs, dtype, train=True, steps=2):
    """Runs both modules ``steps`` times on the same inputs; checks outputs, gradients, buffers."""
    orig.train(train)
    conv.train(train)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    for step in range(steps):
        o1, o2 = orig(*inputs), conv(*inputs)
        close(o2, o1, dtype, f"output (step {step})")
        g = torch.randn_like(o1)
        g1 = torch.autograd.grad(o1, leaves + list(orig.parameters()), g, allow_unused=True)
        g2 = torch.autograd.grad(o2, leaves + list(conv.parameters()), g, allow_unused=True)
        names = [f"input {i}" for i in range(len(leaves))] + [n for n, _ in orig.named_parameters()]
        for n, a, b in zip(names, g2, g1):
            if b is None:
                assert a is None or not a.abs().any(), n
                continue
            close(a, b, dtype, f"grad {n} (step {step})")
    for (n, a), (_, b) in zip(conv.named_buffers(), orig.named_buffers()):
        close(a.double(), b.double(), torch.float64 if a.dtype == torch.float64 else dtype, f"buffer {n}")


def outputs_and_grads(module, inputs, g):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    out = module(*inputs)
    grads = torch.autograd.grad(out, leaves + list(module.parameters()), g.to(out.dtype))
    return [out.detach().double()] + [x.double() for x in grads]


def compare32(orig, conv, inputs):
    """float32: the converted module is as close to the float64 original as the float32 original."""
    truth = copy.deepcopy(orig).double()
    as64 = [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in inputs]
    g = torch.randn_like(truth(*as64).detach())
    want = outputs_and_grads(truth, as64, g)
    own = outputs_and_grads(orig, inputs, g)
    got = outputs_and_grads(conv, inputs, g)
    for i, (a, b, w) in enumerate(zip(got, own, want)):
        scale = max(1.0, float(w.abs().max()))
        err, own_err = float((a - w).abs().max()), float((b - w).abs().max())
        assert err <= max(1e-5 * scale, 4 * own_err), f"tensor {i}: error {err:.3g}, original's {own_err:.3g}"
