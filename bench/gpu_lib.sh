#!/usr/bin/env bash
# Helpers shared by bench/gpu_check.sh and bench/gpu_perf.sh (sourced; expects OUT and SUMMARY to be set).

note() { echo "$*" | tee -a "$SUMMARY"; }

# DRY_RUN=1: each step prints the command it would run (shell-quoted, on one line after "would run:") and runs
# nothing, on any machine: a run's plan can be read before device minutes are spent on it, and the tests check
# every printed command against its parser (bash itself expands the loops and variables, not a copy in a test).
DRY_RUN=${DRY_RUN:-0}
dry() { [ "$DRY_RUN" = 1 ]; }

# An interpreter whose torch sees a GPU (in a dry run: one that imports torch): $PYTHON, else the repo's venv,
# else python3/python on PATH.
pick_python() {
  local candidate need="torch.cuda.is_available()"
  dry && need=True
  for candidate in ${PYTHON:-} .venv/bin/python python3 python; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || [ -x "$candidate" ] || continue
    if "$candidate" -c "import torch, sys; sys.exit(0 if $need else 1)" 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
if ! PY=$(pick_python); then
  note "FAIL: no python whose torch sees a CUDA device (set PYTHON=...)"
  exit 2
fi

# Wheels carried in .whl (`bash dev.sh gpu-wheels` here; diffusers and its needs, which the GPU machine's image
# lacks): installed into a folder of their own, first on the path, before anything runs.
if ! dry && ls .whl/*.whl >/dev/null 2>&1; then
  SITE=${TMPDIR:-/tmp}/memsafe-gpu-site
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .whl/*.whl >"$OUT/wheels.log" 2>&1; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    note "wheels: installed $(ls .whl | tr '\n' ' ')"
  else
    note "wheels: FAILED to install .whl/*.whl (log: wheels.log)"
  fi
fi

# ninja: torch runs it from PATH; a venv used without activation keeps it in its bin folder.
if ! command -v ninja >/dev/null 2>&1; then
  NINJA_DIR=$("$PY" -c "import ninja, os; print(ninja.BIN_DIR)" 2>/dev/null || dirname "$PY")
  [ -x "$NINJA_DIR/ninja" ] && export PATH="$NINJA_DIR:$PATH"
fi

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, record status and duration
  local name=$1 limit=$2
  shift 2
  if dry; then
    note "$name: would run: $(printf '%q ' "$@")"
    return 0
  fi
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local status="ok"
  [ $rc -eq 0 ] || status="FAILED (exit $rc$([ $rc -eq 124 ] && echo ', timed out'))"
  note "$name: $status in $(($(date +%s) - t0)) s (log: $name.log)"
  return $rc
}

