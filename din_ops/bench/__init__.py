"""Benchmarks of din_ops: providers per op (attention_pooling, dice, mba), shared by the
pytest-benchmark suites in bench/ and the main job, ``python -m din_ops.bench`` (runner.py)."""
