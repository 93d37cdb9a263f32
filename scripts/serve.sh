#!/usr/bin/env bash
# Quick start: set up, ingest the demo catalog (skipped when unchanged), serve on the embedded defaults:
# embedded Chroma under ./var, MiniLM from its package, SmolLM2 via a local llama.cpp server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
adselect ingest --ads data/demo/ads.jsonl --history data/demo/impressions.jsonl
exec adselect serve --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
