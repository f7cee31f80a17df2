#!/usr/bin/env bash
# Installs shardckpt and its test tools into the current Python. Idempotent and quick
# when everything is already there. torch==2.13.0 is installed first, and only when no
# torch is present: a bare `pip install torch` would pull a multi-GB CUDA build, while
# GPU users keep the build they brought.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
if ! "$PY" -c "import shardckpt, pytest, safetensors, hypothesis, jsonschema, lightning, s3fs, moto, transformers" >/dev/null 2>&1 \
    || [ "${SHARDCKPT_FORCE_INSTALL:-0}" = 1 ] || [ -n "${CI:-}" ]; then
    "$PY" -m pip install --quiet -e ".[test,lightning]"
fi
