"""din_ops under DistributedDataParallel (gloo, CPU, 2 processes).

Two processes each run half of a global batch through a DIN built on din_ops (fused attention
pooling, sparse embedding gradients); DDP averages the dense gradients and
``din_ops.models.sync_sparse_grads_`` the sparse ones (``din_ops.models.distributed`` leaves the
tables out of DDP, whose gloo sparse all-reduce corrupted the heap now and then in our runs). They must equal the gradients
of one process on the whole batch, and one ``din_ops.optim.MBAAdagrad`` step (MBA on the sparse
tables) must give the same parameters. float64, tolerance 1e-12. (Dice is left out on purpose:
its batch statistics are per process under DDP, as BatchNorm's are without SyncBatchNorm.)
"""
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import din_ops
import din_ops.models

WORLD = 2
B, T = 12, 7
ITEMS, CATS, USERS = 30, 5, 9


def _model():
    torch.manual_seed(0)
    m = din_ops.models.DIN(ITEMS, CATS, (USERS, 3), embed_dim=4, attention_units=(8, 4), mlp_units=(10, 5),
                           mlp_activation="prelu", attention_normalization="softmax", init_std=0.3)
    return m.double()


def _batch():
    g = torch.Generator().manual_seed(1)
    L = torch.randint(1, T + 1, (B,), generator=g)
    valid = torch.arange(T) < L[:, None]
    return dict(users=torch.stack([torch.randint(1, USERS + 1, (B,), generator=g),
                                   torch.randint(1, 4, (B,), generator=g)], 1),
                items=torch.randint(1, ITEMS + 1, (B,), generator=g),
                categories=torch.randint(1, CATS + 1, (B,), generator=g),
                hist_items=torch.randint(1, ITEMS + 1, (B, T), generator=g) * valid,
                hist_categories=torch.randint(1, CATS + 1, (B, T), generator=g) * valid,
                lengths=L, labels=torch.randint(0, 2, (B,), generator=g).double())


INPUTS = ("users", "items", "categories", "hist_items", "hist_categories", "lengths")


def _step(model, core, batch, sync=False):
    """Loss (mean over this process' examples), backward, gradients, one MBA step, parameters."""
    freqs = core.frequencies([_batch()])
    opt = din_ops.optim.MBAAdagrad(model.parameters(), lr=0.1, lam=0.5, frequencies=freqs,
                                   padding_idx=din_ops.optim.embedding_padding(core))
    loss = F.binary_cross_entropy_with_logits(model(*(batch[k] for k in INPUTS)), batch["labels"])
    loss.backward()
    if sync:
        din_ops.models.sync_sparse_grads_(core)
    grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in core.named_parameters()}
    opt.step()
    params = {n: p.detach().clone() for n, p in core.named_parameters()}
    return grads, params


def _worker(rank, init_file, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        core = _model()
        model = din_ops.models.distributed(core)
        full = _batch()
        lo, hi = rank * B // WORLD, (rank + 1) * B // WORLD
        grads, params = _step(model, core, {k: v[lo:hi] for k, v in full.items()}, sync=True)
        if rank == 0:
            torch.save({"grads": grads, "params": params}, out_path)
        # both ranks done with every collective before either tears gloo down (rank 0 once
        # aborted, std::terminate, after both ranks had synchronized their gradients)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_single_process(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    got = torch.load(out)
    core = _model()
    grads, params = _step(core, core, _batch())
    assert set(got["grads"]) == set(grads)
    assert core.item_embedding.weight.grad.is_sparse  # the embedding gradients reduced were sparse
    assert core.attention.layers[0].weight.grad.abs().max() > 0
    for n in grads:
        err = float((got["grads"][n] - grads[n]).abs().max())
        assert err <= 1e-12 * max(1.0, float(grads[n].abs().max())), f"grad {n}: {err:.3g}"
    for n in params:
        err = float((got["params"][n] - params[n]).abs().max())
        if float(grads[n].abs().max()) < 1e-12:
            # a gradient that is zero but for rounding (the attention output layer's bias under
            # softmax): Adagrad divides it by its own size + eps, so the noise of the summation
            # order decides the step; both runs still take a step of at most lr
            assert err <= 2 * 0.1, f"param {n} after the step: {err:.3g}"
            continue
        assert err <= 1e-12 * max(1.0, float(params[n].abs().max())), f"param {n} after the step: {err:.3g}"


def test_example_runs_under_torchrun(tmp_path):
    """examples/train_din_ml100k.py under torchrun (2 gloo processes) on a slice of MovieLens-100K."""
    from compat_libs import require

    require("recbole", "recbole")  # the data set ships inside the recbole wheel
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "ml100k.md"
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           os.path.join(root, "examples", "train_din_ml100k.py"), "--models", "din", "--backends", "din_ops",
           "--epochs", "1", "--max-train", "2048", "--max-test", "1024", "--no-progress", "--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = out.read_text()
    assert "2 process(es)" in table and "| DIN | din_ops |" in table
