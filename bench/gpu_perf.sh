#!/usr/bin/env bash
# The GPU cost of every method (issue 6), in one go, on a machine with an NVIDIA GPU and a CUDA build of torch:
# python -m bench perf on the SD1.5-size UNet at 4x64x64 fp16 (50 steps) and the SDXL-size UNet at 4x128x128 fp16
# (30 steps), batch 2, random weights built on the GPU (nothing downloaded). Time: median of interleaved repeats;
# memory: CUDA max allocated per method, in process. Per-sample rows iterate until the target (a fraction of the
# measured risk) or --max-iterations: on random weights the iteration count is set, not found, so read the rows
# as cost per iteration next to the lab's measured iteration counts.
#
#   OUT=/some/dir bash bench/gpu_perf.sh          # PYTHON=/path/to/python to choose the interpreter
#   DRY_RUN=1 OUT=/tmp/plan bash bench/gpu_perf.sh   # prints the commands it would run, runs none (any machine)
#
# Needs: torch with CUDA and diffusers. The device machine's image has no diffusers: first, here, `bash dev.sh
# gpu-wheels` (into .whl, git-ignored), then carry .whl with the run; bench/gpu_lib.sh installs it. The script
# stops at once, before any timing, if diffusers still cannot build a UNet.
#
# Writes $OUT/perf.json and perf.md (rows as bench/results/perf.json), sd15.log, saved.log, adjust_*.log, sdxl.log,
# summary.txt. Fits a
# 10-minute limit. Then, here: python -m bench perf --import-rows $OUT/perf.json  (merges into bench/results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu_perf}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
source bench/gpu_lib.sh  # note, PY (a python whose torch sees the GPU), ninja on PATH, step
if dry; then
  note "dry run: $PY; nothing is run"
elif ! "$PY" -c "import torch; print('torch', torch.__version__, 'device', torch.cuda.get_device_name(0))" \
    | tee -a "$SUMMARY"; then
  exit 2
elif ! DIFFUSERS=$("$PY" -c "import diffusers; from diffusers import UNet2DConditionModel; print('diffusers', \
    diffusers.__version__)" 2>&1); then
  note "$DIFFUSERS"
  note "FAIL: diffusers cannot be imported (bash dev.sh gpu-wheels here, then carry .whl)"
  exit 2
else
  note "$DIFFUSERS"
fi

COMMON=(--device cuda --dtype float16 --batch 2 --repeats 3 --target-ratio 0.9 --max-iterations 10 --out "$OUT")
FAILED=0
step sd15 240 "$PY" -m bench perf --model sd15 --steps 50 "${COMMON[@]}" || FAILED=1
# what one image's backward keeps on the GPU (CUDA attention kernels, fp16), what checkpointing within a few
# budgets keeps and costs (counts, seconds), and where a backward pass spends its time (per operator family)
step saved 120 "$PY" -m bench saved --model sd15 --latent 64 --dtype float16 --budgets 300,600,1200 \
  --time-repeats 3 --profile 3 || FAILED=1
# one adjustment (every image held to 3 iterations, as the CPU rows) against the sampler's CFG calls made just
# before it: the per-sample time ratio at 50 steps from timings seconds apart
ADJUST=(--model sd15 --dtype float16 --batch 2 --steps 50 --repeats 5)
for method in per_sample_polyak per_sample_polyak_checkpointed; do
  step "adjust_$method" 60 "$PY" -m bench adjust "${ADJUST[@]}" --target-ratio 0.01 --max-iterations 3 \
    --method "$method" || FAILED=1
done
LEFT=$((570 - ($(date +%s) - START)))
if [ $LEFT -gt 60 ]; then
  step sdxl "$LEFT" "$PY" -m bench perf --model sdxl --steps 30 "${COMMON[@]}" || FAILED=1
else
  note "sdxl: skipped (${LEFT} s left)"
fi
# after SDXL, which matters more, if time is left: the batch-wise adjustment the same way (its preset's
# iterations), and the opt-in held norm at the 2 iterations it takes on most lab images (README, Held norm)
adjust_if_time_left() {  # name, then bench adjust's own arguments
  local name=$1 left=$((570 - ($(date +%s) - START)))
  shift
  if [ $left -gt 30 ]; then
    step "$name" $((left < 60 ? left : 60)) "$PY" -m bench adjust "${ADJUST[@]}" "$@" || FAILED=1
  else
    note "$name: skipped (${left} s left)"
  fi
}
adjust_if_time_left adjust_batch_wise --method batch_wise
adjust_if_time_left adjust_per_sample_polyak_step0.1_hold2 --target-ratio 0.01 --max-iterations 2 \
  --method per_sample_polyak_step0.1_hold2
grep -h "time x" "$OUT"/sd15.log "$OUT"/sdxl.log 2>/dev/null | tee -a "$SUMMARY"
grep -h "MiB\|profile\|its forward" "$OUT"/saved.log 2>/dev/null | tee -a "$SUMMARY"
grep -h "bench adjust\|predicted" "$OUT"/adjust_*.log 2>/dev/null | tee -a "$SUMMARY"
note "total: $(($(date +%s) - START)) s; $([ $FAILED -eq 0 ] && echo PASS || echo FAIL)"
exit $FAILED
