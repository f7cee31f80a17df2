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
# Installed means: the test tools import, and so does shardckpt from outside this folder
# (where the current directory is not on the path), as this checkout's own files - an
# install of another checkout (an older clone, a moved folder) is replaced.
here="$(pwd -P)"
installed() {
    (cd / && "$PY" -c "import os, sys, shardckpt, pytest, safetensors, hypothesis, jsonschema, lightning, s3fs, moto, transformers
sys.exit(os.path.realpath(shardckpt.__file__) != os.path.join(sys.argv[1], 'shardckpt', '__init__.py'))" "$here")
}
if ! installed >/dev/null 2>&1 || [ "${SHARDCKPT_FORCE_INSTALL:-0}" = 1 ] || [ -n "${CI:-}" ]; then
    "$PY" -m pip install --quiet -e ".[test,lightning]"
fi
