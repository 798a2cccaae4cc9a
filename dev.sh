#!/usr/bin/env bash
# memsafe's one entry point on a fresh machine. It creates ./.venv (Python 3.10+; torch 2.13.0 CPU build and the
# pinned test tools from requirements-dev.txt) the first time, then runs one job:
#   bash dev.sh demo [--out DIR]   the lab demo: memorization with and without memsafe on the embedded model
#   bash dev.sh test               ruff, then the whole test suite (what CI runs)
#   bash dev.sh bench [...]        the benchmarks in bench/ (see README)
#   bash dev.sh setup              only the environment
#   bash dev.sh gpu-wheels         the wheels bench/gpu_perf.sh needs on the GPU machine, into ./.whl (ignored)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=.venv

setup() {
  local stamp="$VENV/.memsafe-requirements"
  if [ -f "$stamp" ] && cmp -s requirements-dev.txt "$stamp"; then
    return
  fi
  echo "memsafe: setting up $VENV (first run only; a few minutes)" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements-dev.txt
  # k-diffusion's samplers only (what A1111 runs): its declared requirements would pull a CUDA torch.
  "$VENV/bin/python" -m pip install -q --no-deps k-diffusion==0.1.1.post1
  cp requirements-dev.txt "$stamp"
}

job=${1:-test}
[ $# -gt 0 ] && shift
case "$job" in
  setup) setup ;;
  test)
    setup
    "$VENV/bin/ruff" check .
    "$VENV/bin/python" -m pytest "$@"
    ;;
  demo)
    setup
    "$VENV/bin/python" -m memsafe.lab.demo "$@"
    ;;
  bench)
    setup
    "$VENV/bin/python" -m bench "$@"
    ;;
  gpu-wheels)
    # The device machine's image has a CUDA torch, numpy, huggingface-hub, safetensors, ... but not diffusers
    # (bench/models.py builds its UNets with it) nor these of its needs: pure-Python wheels, at the versions
    # requirements-dev.txt pins. bench/gpu_lib.sh installs whatever lies in .whl first: carry .whl with the run.
    setup
    rm -rf .whl
    pins=()
    for name in diffusers importlib_metadata lazy-importer zipp; do
      pins+=("$(grep "^$name==" requirements-dev.txt)")
    done
    "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: -d .whl "${pins[@]}"
    ls .whl
    ;;
  *)
    echo "usage: bash dev.sh {demo|test|bench|setup|gpu-wheels} [args...]" >&2
    exit 2
    ;;
esac
