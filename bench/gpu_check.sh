#!/usr/bin/env bash
# The GPU check of the fused ops (issue 5), in one go, on a machine with an NVIDIA GPU and a CUDA build of torch:
#   1. build the CUDA extension (and the C++ one) with memsafe's own loader, forced: MEMSAFE_OPS_BACKEND=cuda;
#   2. run tests/test_ops.py (its CUDA cases run there: every op against its reference on the GPU);
#   3. run bench/bench_ops.py on CPU and CUDA with a real UNet pass on CUDA (--unet).
# Everything lands under $OUT (default ./out/gpu_check): env.txt, build.log, test_ops.log, test_ops.xml,
# bench.log, ops_gpu.md, ops_gpu.json, summary.txt. Fits a 10-minute limit: each step has its own timeout and the
# benchmark writes its results after every case, so a cut run still leaves numbers.
#
#   OUT=/some/dir bash bench/gpu_check.sh          # PYTHON=/path/to/python to choose the interpreter
#   DRY_RUN=1 OUT=/tmp/plan bash bench/gpu_check.sh   # prints the commands it would run, runs none (any machine)
#
# Needs: torch with CUDA, a CUDA toolkit whose nvcc has torch's CUDA major version (found via CUDA_HOME, the nvcc
# on PATH or /usr/local/cuda*), a C++ compiler, ninja, pytest; diffusers for the UNet timing (skipped without it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT"
export MEMSAFE_BUILD_DIR=${MEMSAFE_BUILD_DIR:-${TMPDIR:-/tmp}/memsafe-gpu-check-cache}
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MEMSAFE_REQUIRE_CUDA_BUILD=1  # tests/test_ops.py: a missing CUDA build fails instead of skipping
unset MEMSAFE_OPS_BACKEND
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

source bench/gpu_lib.sh  # note, PY (a python whose torch sees the GPU), ninja on PATH, step
dry || {
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(uname -a)"
  echo "python: $PY ($("$PY" --version 2>&1))"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))"
  "$PY" -c "import pytest; print('pytest', pytest.__version__)" 2>&1
  "$PY" -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1
  echo "ninja: $(command -v ninja || echo missing) $(ninja --version 2>/dev/null)"
  echo "c++: $(command -v "${CXX:-c++}" || echo missing)"
  echo "CUDA_HOME=${CUDA_HOME:-unset}; nvcc on PATH: $(command -v nvcc || echo none)"
  for nvcc in ${CUDA_HOME:+$CUDA_HOME/bin/nvcc} /usr/local/cuda*/bin/nvcc; do
    [ -x "$nvcc" ] && echo "$nvcc: $("$nvcc" --version | grep release)"
  done
  nvidia-smi 2>&1 | head -20
} >"$OUT/env.txt" 2>&1
note "python: $PY; cache: $MEMSAFE_BUILD_DIR; MAX_JOBS=$MAX_JOBS"

FAILED=0
# 1. Build through the loader, as the WebUI's first call would (prints the one log line and the backend info).
step build 330 env MEMSAFE_OPS_BACKEND=cuda "$PY" -m memsafe._backend info || FAILED=1
grep -h "memsafe ops:" "$OUT/build.log" 2>/dev/null | tee -a "$SUMMARY"
for log in "$MEMSAFE_BUILD_DIR"/*/*/build-error.log; do
  [ -f "$log" ] && cp "$log" "$OUT/build-error-$(basename "$(dirname "$log")").log"
done

# 2. The op tests (CPU and CUDA cases; the nvcc compile check of the header too).
if [ $FAILED -eq 0 ]; then
  step test_ops 200 "$PY" -m pytest tests/test_ops.py -q -rs -p no:cacheprovider --junitxml="$OUT/test_ops.xml" \
    || FAILED=1
  dry || tail -n 3 "$OUT/test_ops.log" | tee -a "$SUMMARY"
else
  note "test_ops: skipped (the CUDA extension did not build)"
fi

# 3. The benchmark, with whatever time is left (results are written after every case).
LEFT=$((570 - ($(date +%s) - START)))
if [ $FAILED -eq 0 ] && [ $LEFT -gt 30 ]; then
  UNET=--unet
  "$PY" -c "import diffusers" 2>/dev/null || UNET=
  step bench "$LEFT" "$PY" bench/bench_ops.py --device all $UNET --unet-device cuda --rounds 5 \
    --out "$OUT" --name ops_gpu || FAILED=1
else
  note "bench: skipped (${LEFT} s left or an earlier step failed)"
fi

note "total: $(($(date +%s) - START)) s; $([ $FAILED -eq 0 ] && echo PASS || echo FAIL)"
exit $FAILED
