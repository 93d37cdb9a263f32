#!/usr/bin/env bash
# Set up and run the whole test suite (real Chroma, real MiniLM, a real llama.cpp server process).
set -euo pipefail
cd "$(dirname "$0")/.."
ADSELECT_SETUP_STRICT=1 bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q -p no:cacheprovider "$@"
