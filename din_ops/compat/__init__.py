"""Drop din_ops into DIN code written for other libraries: one call converts a model in place.

- :mod:`din_ops.compat.deepctr_torch`: DeepCTR-Torch 0.3.0 (``AttentionSequencePoolingLayer``,
  ``LocalActivationUnit``, ``Dice``, ``DIN``).
- :mod:`din_ops.compat.torch_rechub`: torch-rechub 0.9.0 (DIN's ``ActivationUnit``).
- :mod:`din_ops.compat.recbole`: RecBole 1.2.1 (``SequenceAttLayer``).
- :mod:`din_ops.compat.torchrec`: not an adapter but DIN built on TorchRec 1.8.0
  (``TorchRecDIN``: the tables in an ``EmbeddingCollection``, sharded with
  ``DistributedModelParallel``; MBA on sharded tables). It imports torchrec when imported itself
  (``pip install --no-deps -r requirements-torchrec.txt``); nothing else in din_ops does.

Each ``convert(model, ...)`` keeps the model's parameters, buffers and ``state_dict`` keys: the
converted modules become subclasses of their original classes whose ``forward`` calls the fused
ops; a converted model still pickles (``torch.save``, ``copy.deepcopy``) and loads in any
process with din_ops and the library installed. Where a library's semantics differ from the
paper's, the default reproduces the library and an option gives the corrected behaviour;
docs/compat.md lists every difference. The submodules import their library only when ``convert``
is called.
"""
