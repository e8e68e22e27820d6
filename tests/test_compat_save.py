"""Converted models survive saving: ``torch.save``/``torch.load``, ``pickle``, ``copy.deepcopy`` and
the libraries' own training loops with their checkpoints (DeepCTR-Torch 0.3.0, torch-rechub 0.9.0,
RecBole 1.2.1, installed by the test set-up).

A copy must still be made of the swapped classes (so it runs ``din_ops::attention_pooling``, seen
by the profiler) and give the same outputs, gradients and running statistics as the model it was
made from, also when loaded in a fresh process that imported only torch and the library.

The three training loops run for real. What each one saves:

- DeepCTR-Torch ``fit`` with ``ModelCheckpoint(save_weights_only=False)``: ``torch.save(model)``.
- torch-rechub ``CTRTrainer.fit``: ``torch.save(model.state_dict())`` to ``model_path``, and its
  early stopping deep-copies the ``state_dict``; the whole trained model is then saved as well.
- RecBole ``Trainer.fit``: ``_save_checkpoint`` saves ``config``, ``state_dict``, optimizer and
  ``other_parameter()`` (whole modules); ``resume_checkpoint`` and ``evaluate(load_best_model=True)``
  load it; the whole trained model is then saved as well. RecBole 1.2.1 predates NumPy 2 and the
  ``weights_only=True`` default of ``torch.load``: the test restores the NumPy aliases its
  ``Config`` assigns from, and sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` for its own loads (nothing
  else is changed: no step of the loop is replaced).
"""
import copy
import inspect
import io
import os
import pickle
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from compat_libs import require

import din_ops.compat.deepctr_torch as dc
import din_ops.compat.recbole as rb
import din_ops.compat.torch_rechub as tr

LIBRARIES = ["deepctr_torch", "torch_rechub", "recbole"]


def run(model, args, g):
    """Output, parameter gradients, buffers after the forward, and the din_ops ops it ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = model(*args)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out, params, g.to(out.dtype), allow_unused=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {"out": out.detach(), "grads": dict(zip(names, grads)),
            "buffers": {n: b.clone() for n, b in model.named_buffers()},
            "ops": sorted({e.name for e in prof.events() if e.name.startswith("din_ops::")})}


def _same(got, want):
    assert "din_ops::attention_pooling" in got["ops"], got["ops"]
    assert torch.equal(got["out"], want["out"])
    assert got["grads"].keys() == want["grads"].keys()
    for n, a in got["grads"].items():
        b = want["grads"][n]
        assert (a is None) == (b is None), n
        assert a is None or torch.equal(a, b), n
    assert got["buffers"].keys() == want["buffers"].keys()
    for n, a in got["buffers"].items():
        assert torch.equal(a, want["buffers"][n]), n


def _swapped(model):
    return {n: type(m) for n, m in model.named_modules() if type(m).__name__.startswith("DinOps")}


# ----------------------------------------------------------------------------- models


def _deepctr_din(dtype=torch.float64):
    require("deepctr_torch", "deepctr_torch")
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DIN

    cols = [SparseFeat("user", 5, embedding_dim=4), SparseFeat("item_id", 12, embedding_dim=4),
            SparseFeat("cate_id", 6, embedding_dim=4),
            VarLenSparseFeat(SparseFeat("hist_item_id", 12, embedding_dim=4, embedding_name="item_id"), 6,
                             length_name="seq_length"),
            VarLenSparseFeat(SparseFeat("hist_cate_id", 6, embedding_dim=4, embedding_name="cate_id"), 6,
                             length_name="seq_length")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DIN(cols, ["item_id", "cate_id"], dnn_hidden_units=(8,), att_hidden_size=(8, 4),
                    att_activation="Dice", init_std=0.3, seed=3)
    return dc.convert(model.to(dtype))


def _deepctr_data(model, B=48, T=6, seed=4):
    g = torch.Generator().manual_seed(seed)
    L = torch.randint(1, T + 1, (B,), generator=g)
    valid = torch.arange(T) < L[:, None]
    x = {"user": torch.randint(0, 5, (B,), generator=g), "item_id": torch.randint(1, 12, (B,), generator=g),
         "cate_id": torch.randint(1, 6, (B,), generator=g),
         "hist_item_id": torch.randint(1, 12, (B, T), generator=g) * valid,
         "hist_cate_id": torch.randint(1, 6, (B, T), generator=g) * valid, "seq_length": L}
    x = {k: v.numpy() for k, v in x.items()}
    y = torch.randint(0, 2, (B,), generator=g).double().numpy()
    X = torch.cat([torch.as_tensor(x[f]).reshape(B, -1).double() for f in model.feature_index], dim=1)
    return x, y, X


def _rechub_din(dtype=torch.float64):
    require("torch_rechub", "torch_rechub.models.ranking.din")
    from torch_rechub.basic.features import SequenceFeature, SparseFeature
    from torch_rechub.models.ranking.din import DIN

    torch.manual_seed(5)
    features = [SparseFeature("user", 6, embed_dim=4)]
    target = [SparseFeature("item", 15, embed_dim=4), SparseFeature("cate", 7, embed_dim=4)]
    history = [SequenceFeature("hist_item", 15, embed_dim=4, pooling="concat", shared_with="item", padding_idx=0),
               SequenceFeature("hist_cate", 7, embed_dim=4, pooling="concat", shared_with="cate", padding_idx=0)]
    model = DIN(features, history, target, mlp_params={"dims": [8]},
                attention_mlp_params={"dims": [8, 4], "activation": "prelu"})
    # the unit and DIN itself are swapped
    return tr.convert(model.to(dtype), mask_padding=True)


def _rechub_data(B=64, T=6, seed=6):
    g = torch.Generator().manual_seed(seed)
    L = torch.randint(1, T + 1, (B,), generator=g)
    valid = torch.arange(T) >= (T - L[:, None])  # torch-rechub pads in front
    x = {"user": torch.randint(0, 6, (B,), generator=g), "item": torch.randint(1, 15, (B,), generator=g),
         "cate": torch.randint(1, 7, (B,), generator=g),
         "hist_item": torch.randint(1, 15, (B, T), generator=g) * valid,
         "hist_cate": torch.randint(1, 7, (B, T), generator=g) * valid}
    return x, torch.randint(0, 2, (B,), generator=g).float()


def _recbole_layer():
    require("recbole", "recbole.model.layers")
    from recbole.model.layers import SequenceAttLayer

    torch.manual_seed(7)
    m = SequenceAttLayer(torch.arange(6).view(1, -1), [4 * 5, 8, 4], activation="dice", softmax_stag=True,
                         return_seq_weight=False)
    return rb.convert(m.double())


def _recbole_args(B=5, T=6, H=5):
    g = torch.Generator().manual_seed(8)
    return (torch.randn(B, H, generator=g, dtype=torch.float64), torch.randn(B, T, H, generator=g, dtype=torch.float64),
            torch.randint(1, T + 1, (B,), generator=g))


def _subject(library):
    """A converted float64 model in training mode and its forward arguments."""
    if library == "deepctr_torch":
        m = _deepctr_din()
        args = (_deepctr_data(m)[2],)
    elif library == "torch_rechub":
        m = _rechub_din()
        args = (_rechub_data()[0],)
    else:
        m = _recbole_layer()
        args = _recbole_args()
    assert _swapped(m)
    return m.train(), args


def _restoring(model, fn):
    """``fn()``, then ``model``'s state put back (a forward in training updates running statistics)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = fn()
    model.load_state_dict(state)
    return res


def _reference(model, args, g):
    return _restoring(model, lambda: run(model, args, g))


def _seed_grad(model, args):
    with torch.no_grad():
        shape = _restoring(model, lambda: model(*args)).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


# ----------------------------------------------------------------------------- round trips


def _torch_save(m):
    f = io.BytesIO()
    torch.save(m, f)
    f.seek(0)
    return torch.load(f, weights_only=False)


ROUND_TRIPS = {
    "torch.save": _torch_save,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "pickle-protocol-0": lambda m: pickle.loads(pickle.dumps(m, protocol=0)),
    "deepcopy": copy.deepcopy,
}


@pytest.mark.parametrize("library", LIBRARIES)
def test_round_trips_keep_classes_sharing_and_results(library):
    """Each round trip keeps the swapped classes, shared modules and parameters, and the results."""
    model, args = _subject(library)
    classes = _swapped(model)
    tied = next(p for n, p in model.named_parameters() if "weight" in n)
    holder = nn.ModuleList([model, model])  # one module twice, and a parameter registered twice
    holder.register_parameter("tied", tied)
    g = _seed_grad(model, args)
    copies = {how: trip(holder) for how, trip in ROUND_TRIPS.items()}  # all from the same state
    want = run(model, args, g)
    for how, c in copies.items():
        assert c[0] is c[1] and c[0] is not model, how
        assert _swapped(c[0]) == classes, how
        assert c.tied is next(p for n, p in c[0].named_parameters() if "weight" in n), how
        assert c.tied is not tied and c.tied.data_ptr() != tied.data_ptr(), how
        assert c[0].training and c[0].state_dict().keys() == model.state_dict().keys(), how
        _same(run(c[0], args, g), want)


# ----------------------------------------------------------------------------- fresh process

_FRESH = """
import importlib, sys, torch
path, library, out = sys.argv[1:]
importlib.import_module(library)
assert not [m for m in sys.modules if m.split(".")[0] == "din_ops"], "din_ops imported before loading"
{run}
saved = torch.load(path, weights_only=False)
model, args, g = saved["model"], saved["args"], saved["g"]
types = {{n: (type(m).__module__, type(m).__qualname__, [c.__name__ for c in type(m).__mro__])
          for n, m in model.named_modules()}}
torch.save({{"run": run(model, args, g), "types": types}}, out)
"""


def _load_fresh(tmp_path, library, model, args, g):
    """Saves ``model`` and loads it in a new Python process that imported only torch and ``library``."""
    path, out = tmp_path / "model.pt", tmp_path / "out.pt"
    torch.save({"model": model, "args": args, "g": g}, path)
    script = _FRESH.format(run=inspect.getsource(run))
    p = subprocess.run([sys.executable, "-c", script, str(path), library, str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    res = torch.load(out, weights_only=False)
    for n, cls in _swapped(model).items():
        module, qualname, mro = res["types"][n]
        assert (module, qualname) == (cls.__module__, cls.__qualname__), n
        assert mro == [c.__name__ for c in cls.__mro__], n
    return res["run"]


@pytest.mark.parametrize("library", LIBRARIES)
def test_torch_load_in_a_fresh_process(library, tmp_path):
    model, args = _subject(library)
    g = _seed_grad(model, args)
    want = _reference(model, args, g)
    _same(_load_fresh(tmp_path, library, model, args, g), want)


# ----------------------------------------------------------------------------- library loops


def test_deepctr_torch_fit_with_model_checkpoint(tmp_path):
    """``fit`` with ``ModelCheckpoint(save_weights_only=False)`` saves the whole model every epoch."""
    from deepctr_torch.callbacks import ModelCheckpoint

    model = _deepctr_din(torch.float32)
    x, y, X = _deepctr_data(model, B=96)
    model.compile("adam", "binary_crossentropy", metrics=["binary_crossentropy", "auc"])
    path = str(tmp_path / "din.pt")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, validation_split=0.25,
              callbacks=[ModelCheckpoint(path, save_weights_only=False)])
    loaded = torch.load(path, weights_only=False)
    assert _swapped(loaded) == _swapped(model)
    X, g = X.float(), torch.randn(X.shape[0], 1)
    np.testing.assert_array_equal(loaded.predict(x, batch_size=32), model.predict(x, batch_size=32))
    want = _reference(model.train(), (X,), g)
    _same(run(loaded.train(), (X,), g), want)
    # and once more, in a process that has not imported din_ops
    _same(_load_fresh(tmp_path, "deepctr_torch", model, (X,), g), want)


def test_torch_rechub_ctr_trainer(tmp_path):
    """``CTRTrainer`` (early stopping, ``model_path``) saves the ``state_dict``; the trained model also pickles."""
    from torch.utils.data import DataLoader
    from torch_rechub.trainers import CTRTrainer
    from torch_rechub.utils.data import TorchDataset

    model = _rechub_din(torch.float32)
    x, y = _rechub_data(B=96)
    tx = {k: v[:64] for k, v in x.items()}
    vx = {k: v[64:] for k, v in x.items()}
    train = DataLoader(TorchDataset(tx, y[:64]), batch_size=16, shuffle=True)
    val = DataLoader(TorchDataset(vx, y[64:]), batch_size=16)
    trainer = CTRTrainer(model, optimizer_params={"lr": 1e-2, "weight_decay": 0.0}, n_epoch=3, earlystop_patience=1,
                         model_path=str(tmp_path))
    stops, stop = [], trainer.early_stopper.stop_training
    trainer.early_stopper.stop_training = lambda auc, w: stops.append(stop(auc, w)) or stops[-1]
    trainer.fit(train, val)
    assert stops[-1]  # it stopped early, loading the deep-copied best state_dict
    fresh = _rechub_din(torch.float32)
    fresh.load_state_dict(torch.load(tmp_path / "model.pth"))
    g = torch.randn(96)
    want = _reference(model.train(), (x,), g)
    _same(run(fresh.train(), (x,), g), want)
    assert trainer.evaluate(_torch_save(model), val) == trainer.evaluate(model, val)
    _same(_load_fresh(tmp_path, "torch_rechub", model.train(), (x,), g), want)


@pytest.fixture
def recbole_shims(monkeypatch, tmp_path):
    """RecBole's ``Config`` assigns ``np.float = np.float_`` etc., aliases NumPy 2 removed."""
    aliases = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_, "bool": np.bool_,
               "int": np.int_, "float": np.float64, "complex": np.complex128, "object": np.object_, "str": np.str_,
               "long": np.int_, "unicode": np.str_}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # NumPy 2 warns on np.object, np.str
        for k, v in aliases.items():
            monkeypatch.setattr(np, k, getattr(np, k, v), raising=False)  # restored afterwards
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # RecBole's torch.load calls pass no weights_only
    monkeypatch.chdir(tmp_path)  # its Trainer writes TensorBoard logs under the working directory
    # importing RecBole's model zoo (recbole/model/sequential_recommender/sine.py) turns on
    # autograd anomaly detection for the whole process: put it back afterwards
    anomaly = torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()
    yield
    torch.autograd.set_detect_anomaly(*anomaly)


def _recbole_setup(tmp_path):
    require("recbole", "recbole.model.layers")
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import DIN

    os.makedirs(tmp_path / "tiny", exist_ok=True)
    rng = random.Random(0)
    with open(tmp_path / "tiny" / "tiny.inter", "w") as f:
        f.write("user_id:token\titem_id:token\tlabel:float\ttimestamp:float\n")
        for t in range(120):
            f.write(f"{t % 12}\t{rng.randrange(20)}\t{rng.randrange(2)}\t{t}\n")
    config = Config(model="DIN", dataset="tiny", config_dict={
        "data_path": str(tmp_path), "checkpoint_dir": str(tmp_path / "saved"), "epochs": 3, "stopping_step": 1,
        "train_batch_size": 32, "eval_batch_size": 64, "embedding_size": 4, "mlp_hidden_size": [8, 8],
        "learning_rate": 1e-2, "MAX_ITEM_LIST_LENGTH": 5, "LABEL_FIELD": "label", "train_neg_sample_args": None,
        "load_col": {"inter": ["user_id", "item_id", "label", "timestamp"]},
        "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": None, "mode": "labeled"},
        "metrics": ["AUC", "LogLoss"], "valid_metric": "AUC", "use_gpu": False, "seed": 0, "state": "ERROR",
        "save_dataset": False, "save_dataloaders": False, "log_wandb": False, "show_progress": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = create_dataset(config)
        train, valid, test = data_preparation(config, dataset)

    def new_model():
        torch.manual_seed(10)
        return rb.convert(DIN(config, train._dataset))

    return config, new_model, (train, valid, test)


def test_recbole_trainer_checkpoints(tmp_path, recbole_shims):
    """RecBole's ``Trainer``: ``fit`` saves checkpoints, ``resume_checkpoint`` and ``evaluate`` load them."""
    from recbole.trainer import Trainer

    config, new_model, (train, valid, test) = _recbole_setup(tmp_path)
    model = new_model()
    trainer = Trainer(config, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(train, valid, saved=True, verbose=False)
        result = trainer.evaluate(test, load_best_model=True)  # the best checkpoint, into the model
        resumed = Trainer(config, new_model())
        resumed.resume_checkpoint(trainer.saved_model_file)
        assert resumed.evaluate(test, load_best_model=False) == result
    batch = next(iter(test))[0]
    args = (batch[model.USER_ID], batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN], batch[model.POS_ITEM_ID])
    g = torch.randn(len(batch))
    want = _reference(model.train(), args, g)
    _same(run(resumed.model.train(), args, g), want)
    assert isinstance(resumed.model.attention, type(model.attention))
    loaded = _torch_save(model)
    assert _swapped(loaded) == _swapped(model)
    _same(run(loaded.train(), args, g), want)
    _same(_load_fresh(tmp_path, "recbole.model.sequential_recommender", model.train(), args, g), want)
