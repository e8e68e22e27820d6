"""The Triton kernels compile for the GPUs they run on, without one: ``bench/triton_compile_check.py
--quick`` compiles the variants its configurations launch for sm_90a (H100/H200) and sm_80 (A100)
with triton's compiler and bundled ptxas, and fails on a compile error or a variant above the
target's shared memory that the launcher cannot fall back from.

The check runs in a subprocess: under ``TRITON_INTERPRET=1`` (set by conftest.py without a GPU)
the kernels are the interpreter's functions, which cannot be compiled. About 2.5 minutes on 2 cores.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "triton_compile_check.py")


def _load():
    spec = importlib.util.spec_from_file_location("triton_compile_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


cc = _load()
_REASON = cc.unavailable_reason()

ATTENTION = {"_fwd_kernel", "_bwd_kernel", "_stats_kernel", "_finish_kernel"}
DICE = {"_stats_kernel", "_stats_combine_kernel", "_transform_kernel", "_bwd_reduce_kernel", "_sum_parts_kernel",
        "_bwd_dx_kernel"}
MBA = {"_mba_update_kernel", "_mba_pieces_kernel", "_mba_penalty_rows_kernel", "_mba_penalty_backward_kernel"}
EMB = {"_gather_kernel", "_segsum_kernel"}


def test_quick_subset_covers_the_axes():
    """Every value of every axis appears in the CI subset at least once (no compilation)."""
    quick = cc.quick_cases()
    ap = [c for c in quick if isinstance(c, cc.APCase)]
    trained = [c for c in ap if c.train]
    assert {c.activation for c in trained} == set(cc.ACTIVATIONS)  # every activation's backward
    assert {c.layout for c in ap} == set(cc.LAYOUTS)
    assert {c.dtype for c in ap} == set(cc.DTYPES)
    assert {len(c.hidden) for c in trained} >= {1, 2, 3}
    assert {min(c.C, 16) for c in ap} >= {1, 4, 16}  # CB 1, 4 and 16 (several jobs per row)
    assert {c.normalization for c in ap} == {"none", "softmax"}
    assert any(c.activation == "dice" and c.train for c in ap)  # the statistics kernels
    assert any(c.hidden == (200, 80, 40) and c.dtype == "fp32" and c.train for c in ap)
    dice = [c for c in quick if isinstance(c, cc.DiceCase)]
    assert {c.layout for c in dice} == {"flat", "padded", "lengths"}
    assert {c.train for c in dice} == {True, False}
    mba = [c for c in quick if isinstance(c, cc.MBACase)]
    assert {c.optimizer for c in mba} == {"sgd", "adagrad", "adagrad_rowwise"}
    assert {c.hot for c in mba} == {True, False}
    emb = [c for c in quick if isinstance(c, cc.EmbCase)]
    assert {c.layout for c in emb} >= {"lengths", "jagged"} and {c.dtype for c in emb} >= {"fp32", "bf16"}
    assert len({c.label for c in quick}) == len(quick)
    assert set(quick) <= set(cc.full_cases())


@pytest.mark.skipif(_REASON is not None, reason=f"no Triton NVIDIA compiler: {_REASON}")
def test_quick_compile_check(tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--targets", "sm90a,sm80", "-j", str(os.cpu_count() or 1), "-q",
         "--json", str(out), "--out", str(tmp_path / "report.md")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-6000:] + proc.stderr[-4000:]
    assert out.exists(), tail
    report = json.loads(out.read_text())
    assert proc.returncode == 0 and report["ok"], "\n".join(report["failures"]) + "\n" + tail
    assert not report["failures"]

    limits = {t["name"]: t["shared_limit"] for t in report["targets"]}
    assert set(limits) == {"sm90a", "sm80"}
    for target, limit in limits.items():
        rows = [r for r in report["rows"] if r["target"] == target]
        assert {r["kernel"] for r in rows} == ATTENTION | DICE | MBA | EMB, target
        for r in rows:
            what = f"{target} {r['kernel']} ({r['case']}: {r['variant']})"
            assert r["status"] in ("ok", "over limit, fell back"), f"{what}: {r['status']} {r['error']}"
            assert r["error"] is None and r["regs"] is not None and r["shared"] is not None, what
            assert 0 < r["regs"] <= 255, what
            if r["status"] == "ok":
                assert r["shared"] <= limit, f"{what}: {r['shared']} B of shared memory > {limit}"
    assert (tmp_path / "report.md").read_text().count("\n|") >= len(report["rows"])
