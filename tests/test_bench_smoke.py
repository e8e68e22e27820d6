"""The main job's smoke run: ``python -m din_ops.bench --preset tiny`` in a subprocess.

The tiny preset leaves out the ``compile`` provider (torch.compile's first compilation alone
takes 10+ s on a CPU); the default run covers it. Timing figures are not checked, only that the
run completes, every row passed the correctness check, and the outputs are there and well formed.
It also holds a serving point (one user, C=5 candidates, inference only) and an attention case in
bf16; :func:`test_attention_candidates_match_reference` checks the candidate (``query [B, C, D]``)
path of every provider but ``compile`` directly.
"""
import csv
import os
import subprocess
import sys

import pytest
import torch

from din_ops.bench import attention_pooling as A
from din_ops.bench.runner import CSV_COLUMNS, PRESETS

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
    assert ops == {"attention_pooling", "dice", "mba_update", "embedding_attention_pooling"}
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
                sel = [r for r in timed if (r["op"], r["provider"], r["mode"], r["sweep"], r["dtype"])
                       == (op, provider, mode, "T", "fp32")]
                assert len(sel) == 2, (op, provider, mode)  # the tiny preset's two values of T
                if mode in ("fwd+bwd", "sgd", "adagrad_rowwise"):
                    # din_ops' MBA step updates in place and may allocate no tensor at all
                    in_place = (op, provider) == ("mba_update", "din_ops")
                    assert all(int(r["peak_mem_bytes"]) > (-1 if in_place else 0) for r in sel), (op, provider, mode)
    att = [r for r in timed if r["op"] == "attention_pooling"]
    assert {r["provider"] for r in att} == {"eager", "careful", "din_ops"}
    assert all(float(r["speedup_vs_eager"]) > 0 for r in att)
    # the serving point: C in the CSV and the shape, inference only, every provider timed
    serving = [r for r in att if r["sweep"] == "serving"]
    assert {r["provider"] for r in serving} == {"eager", "careful", "din_ops"}
    assert {r["mode"] for r in serving} == {"inference"}
    assert all(r["C"] == "5" and r["B"] == "1" and " C=5 " in r["shape"] for r in serving)
    assert not [r for r in att if r["sweep"] != "serving" and r["C"]]
    # attention in bf16 (inference and fwd+bwd), checked with the bf16 tolerance
    bf16 = [r for r in att if r["dtype"] == "bf16"]
    assert {(r["provider"], r["mode"]) for r in bf16} == {
        (p, m) for p in ("eager", "careful", "din_ops") for m in ("inference", "fwd+bwd")}
    assert all(float(r["check_tol"]) == 1e-1 for r in bf16)
    summary = (tmp_path / "cpu_summary.md").read_text()
    for title in ("## serving:", "## sweep: attention inference bf16", "## bf16:"):
        assert title in summary, title

    png = tmp_path / "cpu_speedup.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "cpu_summary.md").read_text().startswith("# din_ops benchmark")


@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_attention_candidates_match_reference(normalization):
    """query [B, C, D]: din_ops directly, eager and careful on the history expanded to B*C rows,
    all against din_ops/reference.py (float64, inference and fwd+bwd: output and every gradient)."""
    bench = A.BENCH
    shape = dict(B=2, C=3, T=7, D=5, hidden=(6, 4), normalization=normalization)
    case = bench.make_case(shape, torch.float64, "cpu", seed=3)
    assert case.query.shape == (2, 3, 5) and case.grad_out.shape == (2, 3, 5)
    assert bench.shape_dict(case)["C"] == 3 and " C=3 " in bench.shape_str(case)
    for provider in ("eager", "careful", "din_ops"):
        for mode in ("inference", "fwd+bwd"):
            err, tol = bench.check(provider, case, mode)
            assert err <= tol, (provider, mode, err)
    # the expanded formulation is C independent rows: row (b, c) equals a plain case's row
    plain = A.Case(query=case.query[:, 1].detach(), keys=case.keys.detach(), lengths=case.lengths,
                   weights=case.weights, biases=case.biases, normalization=normalization)
    with torch.no_grad():
        torch.testing.assert_close(A.eager(case)[:, 1], A.eager(plain))
    # useful work counts every (candidate, position) pair; the history is read once
    for mode in ("inference", "fwd+bwd"):
        assert bench.flops(case, mode) == pytest.approx(3 * bench.flops(plain, mode))
        assert bench.bytes_moved(plain, mode) < bench.bytes_moved(case, mode) < 3 * bench.bytes_moved(plain, mode)


def test_serving_presets_are_inference_only():
    for name in ("default", "serving", "full"):
        pts = [s for tag, s in PRESETS[name].shapes if tag == "serving"]
        assert pts and all(s["B"] == 1 and s["C"] and s["modes"] == ("inference",) for s in pts), name
