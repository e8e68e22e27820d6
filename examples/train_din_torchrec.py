"""Train DIN on MovieLens-100K with its tables in TorchRec, sharded over processes.

    python examples/train_din_torchrec.py                                    # 1 process
    torchrun --nproc_per_node=2 examples/train_din_torchrec.py               # row-wise sharding
    torchrun --nproc_per_node=2 examples/train_din_torchrec.py --sharding table_wise

Needs ``pip install --no-deps -r requirements-torchrec.txt``. The model is
:class:`din_ops.compat.torchrec.TorchRecDIN` (the tables in one ``EmbeddingCollection``, the
history's ``JaggedTensor`` straight into din_ops' jagged attention) under
``DistributedModelParallel`` (gloo, CPU): the tables are sharded (``--sharding``) and trained by
FBGEMM's fused exact Adagrad inside the backward, the MLPs are data parallel with
``torch.optim.Adagrad``. Each process trains on its share of every global batch. ``din_mba``
adds the MBA penalty (:class:`din_ops.compat.torchrec.MBA`, frequencies counted on the training
set and replicated on every process).

On one process the script also trains din_ops' own ``din_ops.models.DIN`` (``nn.Embedding``
tables, ``din_ops.optim.MBAAdagrad``) with the same seed, data order and hyper-parameters, in
lock-step with the TorchRec model (each batch goes through both in turn, so a busy machine
slows them alike): the single-process reference the sharded runs are compared with.

Every run updates its rows of ``examples/results/ml100k_torchrec.json`` and rewrites the table
``examples/results/ml100k_torchrec.md`` from all rows: test AUC, GAUC, logloss, training
examples/s (the slowest process; the input ``KeyedJaggedTensor`` is built outside the timed step,
as the padded batches of the din_ops model are), and the bytes of table weights, table optimizer
state and MBA frequencies each process holds. Rank 0 writes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import din_ops  # noqa: E402
import din_ops.models  # noqa: E402
import din_ops.optim  # noqa: E402
import din_ops.compat.torchrec as trec  # noqa: E402
import ml100k  # noqa: E402
from train_din_ml100k import INPUTS, evaluate as evaluate_din, machine  # noqa: E402

MODELS = {"din": False, "din_mba": True}  # name: MBA
LABELS = {"din": "DIN", "din_mba": "DIN + MBA"}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--sharding", default="row_wise", choices=trec.SHARDINGS)
    p.add_argument("--no-reference", action="store_true", help="on one process, skip din_ops' own DIN")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512, help="global batch (split across processes)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--dense-lr", type=float, default=0.01, help="learning rate of the MLPs")
    p.add_argument("--mba-lambda", type=float, default=0.01)
    p.add_argument("--embed-dim", type=int, default=16)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--seed", type=int, default=2018)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--out", default=os.path.join(RESULTS, "ml100k_torchrec.md"),
                   help="the table; its rows are kept next to it in a .json of the same name")
    return p.parse_args(argv)


def kjt(batch):
    return trec.features(*(batch[k] for k in INPUTS))


def share(batch, rank, world):
    n = batch["labels"].shape[0]
    lo, hi = rank * n // world, (rank + 1) * n // world
    return {k: v[lo:hi] for k, v in batch.items()}


def din_config(args):
    return dict(embed_dim=args.embed_dim, mlp_activation="prelu")


def per_process(mem, world):
    """``{kind: [bytes of rank 0, rank 1, ...]}``."""
    t = torch.tensor([mem[k] for k in ("weights", "optimizer", "frequencies")], dtype=torch.int64)
    parts = [t]
    if world > 1:
        parts = [torch.zeros_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
    return {k: [int(p[i]) for p in parts] for i, k in enumerate(("weights", "optimizer", "frequencies"))}


@torch.no_grad()
def evaluate_sharded(dmp, split, rank, world, batch_size=4096):
    """Every process scores its share of each test batch (the lookups are collective); rank 0 gets all."""
    dmp.eval()
    scores = []
    for b in split.batches(batch_size):
        s = torch.sigmoid(dmp(kjt(share(b, rank, world)))[:, 0])
        if world > 1:
            n = torch.tensor([s.numel()])
            sizes = [torch.zeros_like(n) for _ in range(world)]
            dist.all_gather(sizes, n)
            pad = s.new_zeros(int(max(sizes)))
            pad[:s.numel()] = s
            parts = [torch.empty_like(pad) for _ in range(world)]
            dist.all_gather(parts, pad)
            s = torch.cat([p[:int(k)] for p, k in zip(parts, sizes)])
        scores.append(s)
    dmp.train()
    s = torch.cat(scores).numpy()
    y = split.labels.numpy()
    users = split.users[:, 0].numpy()
    return ml100k.auc(y, s), ml100k.gauc(users, y, s), float(F.binary_cross_entropy(
        torch.from_numpy(s).clamp(1e-7, 1 - 1e-7), split.labels))


def train(name, data, args, rank, world):
    mba = MODELS[name]
    lam = args.mba_lambda if mba else 0.0
    runs = []
    torch.manual_seed(args.seed)  # the same initialization for both models
    core = din_ops.models.DIN(data.num_items, data.num_categories, data.user_fields, **din_config(args))
    model = trec.TorchRecDIN.from_din(core)
    freqs = trec.frequencies(model, (kjt(b) for b in data.train.batches(8192))) if mba else None
    dmp = trec.shard(model, args.sharding, optimizer="adagrad", lr=args.lr, eps=1e-10)
    runs.append(dict(impl="torchrec", model=dmp, mba=trec.MBA(model, lam, frequencies=freqs) if mba else None,
                     opt=torch.optim.Adagrad(trec.dense_parameters(dmp), lr=args.dense_lr, eps=1e-10), time=0.0))
    mem = trec.table_bytes(dmp)
    mem["frequencies"] = sum(c.numel() * c.element_size() for c in runs[-1]["mba"].counts.values()) if mba else 0
    runs[-1]["memory"] = per_process(mem, world)
    if world == 1 and not args.no_reference:
        tables = {id(e.weight) for e in core.tables().values()}
        groups = [{"params": [p for p in core.parameters() if id(p) in tables]},
                  {"params": [p for p in core.parameters() if id(p) not in tables], "lr": args.dense_lr}]
        dfreqs = core.frequencies(data.train.batches(8192)) if mba else None
        w = sum(e.weight.numel() * e.weight.element_size() for e in core.tables().values())
        runs.append(dict(impl="din_ops", model=core, time=0.0,
                         opt=din_ops.optim.MBAAdagrad(groups, lr=args.lr, lam=lam, frequencies=dfreqs,
                                                      padding_idx=din_ops.optim.embedding_padding(core)),
                         # element-wise Adagrad: a sum like the table; counts int64 per row
                         memory=dict(weights=[w], optimizer=[w],
                                     frequencies=[sum(c.numel() * 8 for c in dfreqs.values()) if mba else 0])))
    gen = torch.Generator().manual_seed(args.seed)
    seen = 0
    for _epoch in range(args.epochs):
        for batch in data.train.batches(args.batch_size, generator=gen, shuffle=True):
            n = batch["labels"].shape[0]
            part = share(batch, rank, world)
            features = kjt(part)
            for r in runs:
                t0 = time.perf_counter()
                if r["impl"] == "torchrec":
                    out = r["model"](features, mba=r["mba"]) if mba else r["model"](features)
                    logits, penalty = out if mba else (out, 0.0)
                    loss = F.binary_cross_entropy_with_logits(logits[:, 0], part["labels"]) + penalty
                else:
                    logits = r["model"](*(batch[k] for k in INPUTS))
                    loss = F.binary_cross_entropy_with_logits(logits, batch["labels"])
                r["opt"].zero_grad(set_to_none=True)
                loss.backward()  # torchrec: the fused optimizer updates the tables here
                r["opt"].step()
                r["time"] += time.perf_counter() - t0
            seen += n
    results = []
    for r in runs:
        t = r["time"]
        if world > 1:  # the slowest process sets the pace
            tt = torch.tensor([t])
            dist.all_reduce(tt, op=dist.ReduceOp.MAX)
            t = float(tt)
        if r["impl"] == "torchrec":
            auc, gauc, logloss = evaluate_sharded(r["model"], data.test, rank, world)
        else:
            auc, gauc, logloss = evaluate_din(r["model"], data.test)
        results.append(dict(model=name, impl=r["impl"], processes=world,
                            sharding=args.sharding if r["impl"] == "torchrec" else "-",
                            auc=auc, gauc=gauc, logloss=logloss, examples_per_s=seen / t, train_s=t,
                            memory=r["memory"], load=os.getloadavg()[0], machine=machine()))
    return results


def _key(r):
    return (r["model"], r["impl"], r["processes"], r["sharding"])


def _kib(n):
    if isinstance(n, list):  # one per process
        return " / ".join(_kib(x) for x in n)
    return f"{n / 1024:,.1f}"


def write_table(rows, args, data, path):
    order = {m: i for i, m in enumerate(MODELS)}
    rows = sorted(rows, key=lambda r: (order.get(r["model"], 9), r["impl"] != "din_ops", r["processes"], r["sharding"]))
    ref = {r["model"]: r for r in rows if r["impl"] == "din_ops"}
    single = {(r["model"], r["sharding"]): r for r in rows if r["impl"] == "torchrec" and r["processes"] == 1}
    lines = [
        "# DIN on MovieLens-100K with TorchRec tables (DistributedModelParallel, gloo, CPU)",
        "",
        f"Machine: {'; '.join(sorted({r.get('machine', machine()) for r in rows}))}. Written by "
        f"`examples/train_din_torchrec.py`; each row is one run "
        f"(the command in the last column). Other jobs may share the machine.",
        "",
        f"Data: ML-100K from the recbole 1.2.1 wheel; {len(data.train)} training / {len(data.test)} test ratings "
        f"(time-ordered split), as in `ml100k.md`. {args.epochs} epoch(s), global batch {args.batch_size} "
        f"(split across processes), Adagrad lr {args.lr} (tables: FBGEMM's fused exact Adagrad for TorchRec, "
        f"`din_ops.optim.MBAAdagrad` for din_ops) / {args.dense_lr} (MLPs), embeddings {args.embed_dim} per field, "
        f"MBA lambda {args.mba_lambda}, seed {args.seed}.",
        "",
        "Memory: KiB each process holds for the embedding tables (rank 0 / rank 1 / ...): the weights of its shards, "
        "their Adagrad state, and the MBA frequencies (int64 counts, replicated). The MLPs (replicated) are not "
        "counted. Examples/s: global training examples over the slowest process' time in the training steps; the "
        "load average (1 min) at the end of each run says how busy the shared machine was.",
        "",
        "| model | implementation | processes | sharding | test AUC | AUC minus din_ops | test GAUC | test logloss "
        "| train examples/s | load | table weights KiB/process | optimizer state KiB/process | MBA counts KiB/process "
        "| command |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        d = f"{r['auc'] - ref[r['model']]['auc']:+.5f}" if r["model"] in ref and r["impl"] != "din_ops" else ""
        m = r["memory"]
        impl = "din_ops DIN" if r["impl"] == "din_ops" else "TorchRecDIN"
        lines.append(f"| {LABELS[r['model']]} | {impl} | {r['processes']} | {r['sharding']} | {r['auc']:.4f} | {d} "
                     f"| {r['gauc']:.4f} | {r['logloss']:.4f} | {r['examples_per_s']:,.0f} | {r['load']:.1f} "
                     f"| {_kib(m['weights'])} "
                     f"| {_kib(m['optimizer'])} | {_kib(m['frequencies'])} | `{r['command']}` |")
    notes = []
    for r in rows:
        one = single.get((r["model"], "row_wise"))
        if r["impl"] == "torchrec" and r["processes"] > 1 and one is not None:
            notes.append(f"{LABELS[r['model']]} {r['sharding']} on {r['processes']} processes: "
                         f"{max(r['memory']['weights']) / one['memory']['weights'][0]:.3f}x the table weights of one "
                         f"process (the fullest process), {r['examples_per_s'] / one['examples_per_s']:.2f}x its "
                         f"examples/s")
    if notes:
        lines += ["", "Per process against the 1-process TorchRec run: " + "; ".join(notes) + "."]
    lines += ["", "Each step of a sharded run adds gloo all-to-alls (the ids to the shards, the rows back, their "
              "gradients) and, with MBA, one all-gather of the distinct ids; on a machine with as many cores as "
              "processes, shared with other jobs, the speed-up of a second process is small and varies with the "
              "load (the load column). What row-wise sharding buys for sure is half the table memory per process."]
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def main(argv=None):
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    tmp = None
    if world > 1:
        dist.init_process_group("gloo")
    else:  # DistributedModelParallel needs a process group, even of one
        tmp = tempfile.mkdtemp()
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=0, world_size=1)
    torch.set_num_threads(args.threads)
    data = ml100k.load(args.data_dir, max_len=args.max_len)
    data.train, data.test = data.train.head(args.max_train), data.test.head(args.max_test)
    command = ("python" if world == 1 else f"torchrun --nproc_per_node={world}") + " examples/train_din_torchrec.py" \
        + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    results = []
    t0 = time.perf_counter()
    for name in args.models:
        for r in train(name, data, args, rank, world):
            r["command"] = command
            results.append(r)
            if rank == 0:
                print(f"{LABELS[name]:>10} {r['impl']:>8} x{world} {r['sharding']:>10}: AUC {r['auc']:.4f}  "
                      f"GAUC {r['gauc']:.4f}  logloss {r['logloss']:.4f}  {r['examples_per_s']:,.0f} examples/s  "
                      f"tables {_kib(r['memory']['weights'])} KiB", flush=True)
    if rank == 0:
        store = os.path.splitext(args.out)[0] + ".json"
        rows = []
        if os.path.exists(store):
            with open(store) as f:
                rows = json.load(f)
        new = {_key(r) for r in results}
        rows = [r for r in rows if _key(r) not in new] + results
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(store, "w") as f:
            json.dump(rows, f, indent=1)
        print(write_table(rows, args, data, args.out))
        print(f"total {time.perf_counter() - t0:.0f} s")
    dist.barrier()
    dist.destroy_process_group()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
