#!/usr/bin/env bash
# The test command (README): installs what is missing, then runs the whole suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k resharding -x`; a folder runs one
# kind of test: `bash tests/run.sh tests/unit` (tests/conftest.py lists them), `-m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
PY="${PYTHON:-python3}"
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
