#!/usr/bin/env bash
# The GPU check, one command on a machine with a CUDA GPU: builds din_ops, runs the test suite's
# GPU-relevant tests on CUDA, the Triton compile check (quick) and the GPU benchmarks, and writes
# everything under $OUT (default bench/out/gpu), with one summary of what passed in
# $OUT/summary.md. Every stage runs whatever the earlier ones gave (no -x: one pass collects every
# failure); the exit status is 0 only if every stage passed.
#   bash bench/gpu_check.sh            # or OUT=/some/dir bash bench/gpu_check.sh
#
# Time: the whole script ends within TOTAL_LIMIT (420 s = 7 minutes) on one H200 machine. Each
# stage has its own limit, never more than what is left of TOTAL_LIMIT (less a reserve for the
# summary), so the bound holds even if one is raised:
#   build          BUILD_TIMEOUT     75 s  (about 60 s with 16 compile jobs)
#   tests          TEST_TIMEOUT     200 s  (and TEST_TIMEOUT_EACH 60 s per test through
#                                           pytest-timeout, where that plugin is installed)
#   compile check  COMPILE_TIMEOUT  150 s  (bench/triton_compile_check.py --quick, sm90a and sm80;
#                                           it needs no GPU, so it runs beside the tests on all
#                                           cores but two; its longest variant alone takes 30-60 s)
#   benchmarks     BENCH_TIMEOUT    120 s  (the gpu preset, told to start no new shape after
#                                           BENCH_TIMEOUT - 30 s)
# 75 + max(200, 150) + 120 = 395 s, plus about 10 s for the machine query and the summary. A stage
# that reaches its limit is stopped and reported as such: pytest by SIGINT, so that it still
# writes the junit xml of the tests that ran; the compile check and the benchmarks by SIGTERM,
# after which they write what they have.
#
# Files under $OUT (8, as many as the device tool brings back): summary.md, tests.log, tests.xml,
# compile_check.md, bench.log and the benchmark's gpu_bench.csv, gpu_speedup.png, gpu_summary.md;
# build.log only when the build failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1

TOTAL_LIMIT=${TOTAL_LIMIT:-420}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-75}
TEST_TIMEOUT=${TEST_TIMEOUT:-200}
TEST_TIMEOUT_EACH=${TEST_TIMEOUT_EACH:-60}
COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-120}
RESERVE=10  # seconds kept for the summary
# the compile check has its own stage: not inside the tests
TEST_FILTER=${TEST_FILTER:-(triton or cuda) and not test_quick_compile_check}

start=$(date +%s)
now() { echo $(( $(date +%s) - start )); }
stamp() { echo "== $(now)s: $*"; }
# budget LIMIT: LIMIT, or what is left of TOTAL_LIMIT (less the reserve) if that is less; at least 1
budget() {
  local left=$(( TOTAL_LIMIT - RESERVE - $(now) ))
  local b=$(( $1 < left ? $1 : left ))
  echo $(( b < 1 ? 1 : b ))
}
# verdict RC LIMIT: a stage's exit status in words (timeout gives 124, or 137 after its KILL)
verdict() {
  case $1 in
    0) echo "ok" ;;
    124|137) echo "STOPPED at its limit ($2 s)" ;;
    *) echo "FAILED (exit $1)" ;;
  esac
}

# what the summary says, filled in as the stages run
machine="?"; build="not run"; tests="not run"; compile="not run"; bench="not run"
test_rc=-1; compile_rc=-1; bench_rc=-1

write_summary() {
  {
    echo "# GPU check"
    echo
    echo "- machine: $machine"
    echo "- build: $build"
    echo "- tests: $tests"
    echo "- compile check: $compile"
    echo "- benchmarks: $bench"
    echo "- total: $(now) s (limit $TOTAL_LIMIT s)"
    if [[ -s "$WORK/failed_tests.txt" ]]; then
      echo
      echo "## Tests that did not pass"
      echo
      cat "$WORK/failed_tests.txt"
    fi
    if [[ -s "$WORK/compile_failures.txt" ]]; then
      echo
      echo "## Compile check failures"
      echo
      cat "$WORK/compile_failures.txt"
    fi
  } > "$OUT/summary.md"
  echo; cat "$OUT/summary.md"
}

# junit_counts XML: "P passed, F failed, E errors, S skipped, T timed out" (the timed-out tests,
# failed by pytest-timeout, are among F or E too); the tests that did not pass, one line each, go
# to $WORK/failed_tests.txt
junit_counts() {
  python3 - "$1" "$WORK/failed_tests.txt" <<'PY'
import re
import sys
import xml.etree.ElementTree as ET

n = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "timed out": 0}
bad = []
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    fail, err = case.find("failure"), case.find("error")
    if fail is None and err is None:
        n["skipped" if case.find("skipped") is not None else "passed"] += 1
        continue
    node = fail if fail is not None else err
    n["failed" if fail is not None else "errors"] += 1
    message = node.get("message") or ""
    timed_out = re.search(r"Timeout \(?>", message + (node.text or "")[:4000]) is not None
    n["timed out"] += timed_out
    kind = "timed out" if timed_out else ("failed" if fail is not None else "error")
    first = message.splitlines()[0][:200] if message else ""
    bad.append(f"- {kind}: `{case.get('classname', '')}::{case.get('name', '')}`" + (f": {first}" if first else ""))
with open(sys.argv[2], "w") as f:
    f.write("".join(line + "\n" for line in bad))
print(", ".join(f"{v} {k}" for k, v in n.items()))
PY
}

# compile_counts JSON: one line on the compile check's report; its failures go to
# $WORK/compile_failures.txt
compile_counts() {
  python3 - "$1" "$WORK/compile_failures.txt" <<'PY'
import json
import sys

r = json.load(open(sys.argv[1]))
rows = r["rows"]
errors = sum(x["status"] == "compile error" for x in rows)
skipped = sum(x["status"] == "not compiled" for x in rows)
over = sum(x["status"] == "over limit" for x in rows)
fell = sum(x["status"] == "over limit, fell back" for x in rows)
with open(sys.argv[2], "w") as f:
    f.write("".join(f"- {m}\n" for m in r["failures"]))
print(f"{len(rows) - skipped} of {len(rows)} variants compiled for {', '.join(t['name'] for t in r['targets'])} "
      f"(triton {r['triton']}), {errors} compile errors, {over} above the shared-memory limit without a fallback "
      f"({fell} with one)")
PY
}

# ------------------------------------------------------------------------------------------------
stamp "machine"
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -1)
versions=$(python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tail -1)
machine="$gpu; $versions"
echo "$machine"

# ------------------------------------------------------------------------------------------------
limit=$(budget "$BUILD_TIMEOUT")
stamp "build (limit $limit s)"
t0=$(now)
MAX_JOBS=$(nproc) timeout -k 5 "$limit" python3 setup.py build_ext --inplace -q > "$WORK/build.log" 2>&1
build_rc=$?
if (( build_rc != 0 )); then
  cp "$WORK/build.log" "$OUT/build.log"
  tail -30 "$WORK/build.log"
  build="$(verdict "$build_rc" "$limit") after $(( $(now) - t0 )) s, see build.log; nothing else ran"
  write_summary
  exit 1
fi
build="ok ($(( $(now) - t0 )) s)"

# ------------------------------------------------------------------------------------------------
# the compile check needs no GPU: in the background, beside the tests
compile_limit=$(budget "$COMPILE_TIMEOUT")
cores=$(nproc)
jobs=$(( cores > 4 ? cores - 2 : 1 ))
stamp "Triton compile check, quick, in the background (limit $compile_limit s, $jobs processes)"
compile_t0=$(now)
(
  timeout -k 10 "$compile_limit" python3 bench/triton_compile_check.py --quick --targets sm90a,sm80 -j "$jobs" -q \
    --out "$OUT/compile_check.md" --json "$WORK/compile_check.json" > "$WORK/compile_check.log" 2>&1
  echo $? > "$WORK/compile_check.rc"
) &
compile_pid=$!

# ------------------------------------------------------------------------------------------------
limit=$(budget "$TEST_TIMEOUT")
stamp "tests on CUDA (limit $limit s)"
per_test=()
if python3 -c "import pytest_timeout" 2>/dev/null; then
  per_test=(--timeout="$TEST_TIMEOUT_EACH")
  each="$TEST_TIMEOUT_EACH s per test"
else
  each="no per-test limit: pytest-timeout is not installed"
fi
t0=$(now)
# SIGINT restored first: where a caller starts this script in the background it is ignored
timeout -s INT -k 20 "$limit" python3 -c \
  'import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(pytest.main(sys.argv[1:]))' \
  tests -q -p no:cacheprovider -k "$TEST_FILTER" ${per_test[@]+"${per_test[@]}"} --junitxml="$OUT/tests.xml" \
  > "$OUT/tests.log" 2>&1
test_rc=$?
echo "pytest exit $test_rc"; tail -15 "$OUT/tests.log"
counts="no junit xml"
[[ -s "$OUT/tests.xml" ]] && counts=$(junit_counts "$OUT/tests.xml" 2>&1)
case $test_rc in
  124|137) what="STOPPED at its limit ($limit s; the counts cover the tests that ran)" ;;
  5) what="FAILED: no test matches -k '$TEST_FILTER'" ;;
  *) what=$(verdict "$test_rc" "$limit") ;;
esac
tests="$what: $counts ($(( $(now) - t0 )) s; $each)"

# ------------------------------------------------------------------------------------------------
stamp "waiting for the compile check"
wait "$compile_pid"
compile_rc=$(cat "$WORK/compile_check.rc" 2>/dev/null || echo 1)
tail -8 "$WORK/compile_check.log"
if [[ -s "$WORK/compile_check.json" ]]; then
  counts=$(compile_counts "$WORK/compile_check.json" 2>&1)
else
  counts="no report"
  tail -20 "$WORK/compile_check.log" | sed 's/^/    /' > "$WORK/compile_failures.txt"
fi
case $compile_rc in
  2) what="NOT RUN (no Triton NVIDIA compiler, see below)" ;;
  *) what=$(verdict "$compile_rc" "$compile_limit") ;;
esac
compile="$what: $counts ($(( $(now) - compile_t0 )) s, beside the tests); table in compile_check.md"

# ------------------------------------------------------------------------------------------------
limit=$(budget "$BENCH_TIMEOUT")
stamp "benchmarks (limit $limit s)"
t0=$(now)
timeout -k 15 "$limit" python3 -m din_ops.bench --preset gpu --time-limit $(( limit > 40 ? limit - 30 : 10 )) \
  --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60
bench_rc=${PIPESTATUS[0]}
bench="$(verdict "$bench_rc" "$limit") ($(( $(now) - t0 )) s); gpu_summary.md, gpu_bench.csv"

stamp "done"
write_summary
(( test_rc == 0 && compile_rc == 0 && bench_rc == 0 ))
