#!/usr/bin/env bash
# The main job: a 4-rank save, then loads on 3 and 2 ranks (resharding), checked bitwise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
DIR="${1:-runs/demo/step_1000}"
MIB="${MIB:-256}"
export OMP_NUM_THREADS=1
torchrun --standalone --nproc-per-node 4 launch/demo.py save --dir "$DIR" --mib "$MIB"
torchrun --standalone --nproc-per-node 3 launch/demo.py load --dir "$DIR" --mib "$MIB"
torchrun --standalone --nproc-per-node 2 launch/demo.py load --dir "$DIR" --mib "$MIB"
shardckpt inspect "$DIR" 2>/dev/null | head -20 || true
