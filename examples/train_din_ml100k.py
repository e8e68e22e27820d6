"""Train DIN on MovieLens-100K with din_ops and with eager PyTorch, and the paper's ablations.

    python examples/train_din_ml100k.py                                  # every model, both backends
    torchrun --nproc_per_node=2 examples/train_din_ml100k.py --models din --backends din_ops

Models (paper sections 4-6): ``base`` (BaseModel: sum pooling), ``din`` (attention pooling,
PReLU MLP), ``din_dice`` (Dice MLP), ``din_mba`` (MBA regularization of the embeddings),
``din_dice_mba``. Each trains twice from the same seed on the same data order: ``eager`` (the
attention unit and Dice in plain PyTorch, ``torch.optim.Adagrad`` with the MBA term added to the
sparse gradients in PyTorch) and ``din_ops`` (the fused ops, the history's lookups fused into the
attention, ``din_ops.optim.MBAAdagrad``); ``--backends din_ops-lookups din_ops`` compares the
lookups + ``attention_pooling`` with the fused ``embedding_attention_pooling``. The
backends train in lock-step (each batch goes through both models in turn), so a busy machine
slows them alike; each is timed on its own steps. Test AUC, GAUC (paper eq. 5.1) and training
examples/second go to a Markdown table (``examples/results/ml100k.md``).

Under ``torchrun`` every process trains on its share of each global batch with
``DistributedDataParallel`` (gloo, CPU) through :func:`din_ops.models.distributed`, which leaves the
sparse embedding gradients to :func:`din_ops.models.sync_sparse_grads_`; rank 0 evaluates and
writes the table.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import din_ops  # noqa: E402
import din_ops.models  # noqa: E402
import din_ops.optim  # noqa: E402
import ml100k  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # progress bar is optional
    tqdm = None

LOOKUPS = "din_ops-lookups"  # a backend of this script only (see --backends)

MODELS = {
    # name: (class, mlp activation, MBA)
    "base": ("BaseModel", "prelu", False),
    "din": ("DIN", "prelu", False),
    "din_dice": ("DIN", "dice", False),
    "din_mba": ("DIN", "prelu", True),
    "din_dice_mba": ("DIN", "dice", True),
}
LABELS = {"base": "BaseModel (sum pooling)", "din": "DIN", "din_dice": "DIN + Dice", "din_mba": "DIN + MBA",
          "din_dice_mba": "DIN + Dice + MBA"}
INPUTS = ("users", "items", "categories", "hist_items", "hist_categories", "lengths")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--backends", nargs="+", default=["eager", "din_ops"],
                   choices=list(din_ops.models.BACKENDS) + [LOOKUPS],
                   help=f"{LOOKUPS}: din_ops with the history looked up by nn.Embedding, then "
                        "din_ops.attention_pooling (no fused lookups), to measure what "
                        "embedding_attention_pooling adds")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512, help="global batch (split across processes)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--dense-lr", type=float, default=0.01, help="learning rate of the MLPs")
    p.add_argument("--mba-lambda", type=float, default=0.01, help="MBA strength (the paper uses 0.01)")
    p.add_argument("--embed-dim", type=int, default=16)
    p.add_argument("--max-len", type=int, default=50, help="history truncated to the last MAX_LEN ratings")
    p.add_argument("--seed", type=int, default=2018)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (0: cores / processes). Default 1: on a small shared "
                        "machine a second thread mostly waits for a busy core")
    p.add_argument("--data-dir", default=None, help="folder with ml-100k.{inter,item,user} (default: recbole's)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ml100k.md"))
    p.add_argument("--max-train", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--max-test", type=int, default=None, help="use only the first N test examples")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def build(name, backend, data, args):
    cls_name, mlp_act, _ = MODELS[name]
    cls = getattr(din_ops.models, cls_name)
    model = cls(data.num_items, data.num_categories, data.user_fields, embed_dim=args.embed_dim,
                mlp_activation=mlp_act, backend="din_ops" if backend == LOOKUPS else backend)
    if backend == LOOKUPS:  # the history through nn.Embedding lookups and attention_pooling
        object.__setattr__(model, "_history_pooling", None)
    return model


def mba_gradient_(model, lam, freqs):
    """Eager MBA (paper eq. 2.4): add ``lam / n_j * w_j`` to the sparse gradient of present rows j."""
    for p, n in freqs.items():
        if p.grad is None:
            continue
        g = p.grad.coalesce()
        idx = g.indices()[0]
        keep = idx != 0  # the padding row is never regularized (nor updated)
        idx = idx[keep]
        reg = lam / n[idx].clamp_min(1).to(p.dtype)[:, None] * p.detach()[idx]
        p.grad = (g + torch.sparse_coo_tensor(idx[None], reg, p.shape)).coalesce()


def make_optimizer(model, backend, mba, args, freqs):
    """Adagrad; the embedding tables at ``--lr``, the MLPs (attention unit, top MLP) at ``--dense-lr``."""
    lam = args.mba_lambda if mba else 0.0
    tables = {id(e.weight) for e in model.modules() if isinstance(e, torch.nn.Embedding)}
    groups = [{"params": [p for p in model.parameters() if id(p) in tables]},
              {"params": [p for p in model.parameters() if id(p) not in tables],
               "lr": args.dense_lr}]
    if backend in ("din_ops", LOOKUPS):
        return din_ops.optim.MBAAdagrad(groups, lr=args.lr, lam=lam, frequencies=freqs,
                                        padding_idx=din_ops.optim.embedding_padding(model))
    return torch.optim.Adagrad(groups, lr=args.lr)


@torch.no_grad()
def evaluate(model, split, batch_size=4096):
    model.eval()
    scores = []
    for b in split.batches(batch_size):
        scores.append(torch.sigmoid(model(*(b[k] for k in INPUTS))))
    model.train()
    s = torch.cat(scores).numpy()
    y = split.labels.numpy()
    users = split.users[:, 0].numpy()
    return ml100k.auc(y, s), ml100k.gauc(users, y, s), float(F.binary_cross_entropy(
        torch.from_numpy(s).clamp(1e-7, 1 - 1e-7), split.labels))


def train(name, backends, data, args, rank, world):
    """Trains ``name`` once per backend, all in lock-step: every batch goes through each backend's
    model in turn, so they see the same data order and the same machine load (other jobs on a
    shared machine slow the backends alike). Each backend's own step time is what it is timed on."""
    mba = MODELS[name][2]
    runs = []
    for backend in backends:
        torch.manual_seed(args.seed)  # the same initialization for every backend
        core = build(name, backend, data, args)
        freqs = core.frequencies(data.train.batches(8192)) if mba else None
        model, group = core, None
        if world > 1:  # one process group per model: the models train interleaved
            group = dist.new_group(backend="gloo")
            model = din_ops.models.distributed(core, process_group=group)
        runs.append(dict(backend=backend, core=core, model=model, freqs=freqs, group=group,
                         opt=make_optimizer(model, backend, mba, args, freqs), time=0.0))
    gen = torch.Generator().manual_seed(args.seed)
    steps = args.epochs * ((len(data.train) + args.batch_size - 1) // args.batch_size)
    bar = None
    if tqdm is not None and rank == 0 and not args.no_progress:
        bar = tqdm(total=steps, desc=f"{LABELS[name]:>24}", unit="batch", leave=False, file=sys.stderr)
    seen = 0
    for _epoch in range(args.epochs):
        for batch in data.train.batches(args.batch_size, generator=gen, shuffle=True):
            n = batch["labels"].shape[0]
            if world > 1:  # this process' share of the global batch
                lo, hi = rank * n // world, (rank + 1) * n // world
                batch = {k: v[lo:hi] for k, v in batch.items()}
                T = max(int(batch["lengths"].max()), 1) if hi > lo else 1
                batch["hist_items"], batch["hist_categories"] = batch["hist_items"][:, :T], batch["hist_categories"][:, :T]
            losses = []
            for r in runs:
                t0 = time.perf_counter()
                logits = r["model"](*(batch[k] for k in INPUTS))
                loss = F.binary_cross_entropy_with_logits(logits, batch["labels"])
                r["opt"].zero_grad(set_to_none=True)
                loss.backward()
                if world > 1:  # DDP averaged the dense gradients; the sparse tables are averaged here
                    din_ops.models.sync_sparse_grads_(r["core"], r["group"])
                if mba and r["backend"] == "eager":
                    mba_gradient_(r["core"], args.mba_lambda, r["freqs"])
                r["opt"].step()
                r["time"] += time.perf_counter() - t0
                losses.append(f"{loss.item():.4f}")
            seen += n
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss="/".join(losses))
    if bar is not None:
        bar.close()
    results = []
    for r in runs:
        train_time = r["time"]
        if world > 1:  # the slowest process sets the pace
            t = torch.tensor([train_time])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            train_time = float(t)
        result = dict(model=name, backend=r["backend"], examples_per_s=seen / train_time, train_s=train_time)
        if rank == 0:
            result["auc"], result["gauc"], result["logloss"] = evaluate(r["core"], data.test)
        results.append(result)
    return results


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        names = [l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")]
        cpu = f"{len(names)}-core {names[0]}" if names else cpu
        if "avx512f" in info:
            cpu += " with AVX-512"
    except OSError:
        pass
    return f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} thread(s) per process"


def write_table(results, args, data, world, path):
    by = {(r["model"], r["backend"]): r for r in results}
    lines = [
        "# DIN on MovieLens-100K: eager PyTorch vs din_ops",
        "",
        f"Machine: {machine()}; {world} process(es); load average {os.getloadavg()[0]:.1f} at the end "
        f"(other jobs share the machine). Written by `examples/train_din_ml100k.py` "
        f"(`{' '.join(sys.argv[1:]) or 'no arguments'}`).",
        "",
        f"Data: ML-100K from the recbole 1.2.1 wheel; {len(data.train)} training / {len(data.test)} test ratings "
        f"(time-ordered split), label `rating >= 4`, history = the user's earlier rated movies (last "
        f"{args.max_len}), category = first genre. {args.epochs} epoch(s), batch {args.batch_size}, Adagrad "
        f"lr {args.lr} (embeddings) / {args.dense_lr} (MLPs), embeddings {args.embed_dim} per field, MBA lambda {args.mba_lambda}, seed {args.seed}.",
        "",
        "| model | backend | test AUC | test GAUC | test logloss | train examples/s | din_ops speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in args.models:
        for backend in args.backends:
            r = by.get((name, backend))
            if r is None:
                continue
            speed = ""
            if backend != "eager" and (name, "eager") in by:
                speed = f"{r['examples_per_s'] / by[(name, 'eager')]['examples_per_s']:.2f}x"
            elif backend == "din_ops" and (name, LOOKUPS) in by:
                speed = f"{r['examples_per_s'] / by[(name, LOOKUPS)]['examples_per_s']:.2f}x vs {LOOKUPS}"
            lines.append(f"| {LABELS[name]} | {backend} | {r['auc']:.4f} | {r['gauc']:.4f} | {r['logloss']:.4f} "
                         f"| {r['examples_per_s']:,.0f} | {speed} |")
    diffs = [(n, by[(n, 'din_ops')]['auc'] - by[(n, 'eager')]['auc']) for n in args.models
             if (n, "din_ops") in by and (n, "eager") in by]
    if diffs:
        lines += ["", "Test AUC, din_ops minus eager (same seed, initialization and data order): "
                  + ", ".join(f"{LABELS[n]} {d:+.5f}" for n, d in diffs) + "."]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text


def main(argv=None):
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    torch.sparse.check_sparse_tensor_invariants.disable()  # torch's default, said explicitly (no warning)
    data = ml100k.load(args.data_dir, max_len=args.max_len)
    data.train, data.test = data.train.head(args.max_train), data.test.head(args.max_test)
    results = []
    t0 = time.perf_counter()
    for name in args.models:
        for r in train(name, args.backends, data, args, rank, world):
            results.append(r)
            backend = r["backend"]
            if rank == 0:
                print(f"{LABELS[name]:>18} {backend:>7}: AUC {r['auc']:.4f}  GAUC {r['gauc']:.4f}  "
                      f"logloss {r['logloss']:.4f}  {r['examples_per_s']:,.0f} examples/s", flush=True)
    if rank == 0:
        print(write_table(results, args, data, world, args.out))
        print(f"total {time.perf_counter() - t0:.0f} s")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
