"""The main job's smoke run: ``python -m din_ops.bench --preset tiny`` in a subprocess.

The tiny preset leaves out the ``compile`` provider (torch.compile's first compilation alone
takes 10+ s on a CPU); the default run covers it. Timing figures are not checked, only that the
run completes, every row passed the correctness check, and the outputs are there and well formed.
"""
import csv
import os
import subprocess
import sys

import torch

from din_ops.bench.runner import CSV_COLUMNS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_tiny_preset(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")  # also without pip install -e
    proc = subprocess.run(
        [sys.executable, "-m", "din_ops.bench", "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "self-check" in proc.stdout and "MISMATCH" not in proc.stdout, proc.stdout[-4000:]

    with open(tmp_path / "cpu_bench.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    ops = {r["op"] for r in rows}
    assert ops == {"attention_pooling", "dice", "mba_update"}
    timed = [r for r in rows if r["status"] == "ok"]
    assert not [r for r in rows if r["status"].startswith(("MISMATCH", "error"))]
    for r in timed:
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert float(r["check_err"]) <= float(r["check_tol"])
        assert r["device_name"] and r["torch_version"] == torch.__version__ and r["din_ops_version"]
        assert float(r["gflops"]) > 0 and float(r["gbps"]) > 0 and float(r["pct_limit"]) > 0
    # every op's eager and din_ops rows, all modes, timed; peak memory for the training modes
    for op, modes in (("attention_pooling", ("inference", "fwd", "fwd+bwd")),
                      ("dice", ("inference", "fwd", "fwd+bwd")), ("mba_update", ("sgd", "adagrad_rowwise"))):
        for provider in ("eager", "din_ops"):
            for mode in modes:
                sel = [r for r in timed if (r["op"], r["provider"], r["mode"]) == (op, provider, mode)]
                assert len(sel) == 2, (op, provider, mode)  # the tiny preset's two values of T
                if mode in ("fwd+bwd", "sgd", "adagrad_rowwise"):
                    assert all(int(r["peak_mem_bytes"]) > 0 for r in sel), (op, provider, mode)
    att = [r for r in timed if r["op"] == "attention_pooling"]
    assert {r["provider"] for r in att} == {"eager", "careful", "din_ops"}
    assert all(float(r["speedup_vs_eager"]) > 0 for r in att)

    png = tmp_path / "cpu_speedup.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "cpu_summary.md").read_text().startswith("# din_ops benchmark")
