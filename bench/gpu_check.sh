#!/usr/bin/env bash
# The GPU check, one command on a machine with a CUDA GPU: builds din_ops, runs the test suite's
# GPU-relevant tests on CUDA, runs the GPU benchmarks, and writes everything under $OUT
# (default bench/out/gpu). Sized for under 8 minutes on one H200.
#   bash bench/gpu_check.sh            # or OUT=/some/dir bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
stamp() { echo "== $(( $(date +%s) - start ))s: $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

stamp "build"
MAX_JOBS=16 python3 setup.py build_ext --inplace -q > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }

stamp "tests on CUDA"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest tests -q -x -p no:cacheprovider -k "${TEST_FILTER:-triton or cuda}" \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
echo "pytest exit $?"; tail -15 "$OUT/tests.log"

stamp "benchmarks"
timeout ${BENCH_TIMEOUT:-240} python3 -m din_ops.bench --preset gpu --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60
stamp "done"
