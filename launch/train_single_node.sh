#!/usr/bin/env bash
# Train on one node with torchrun; resumes by itself from the latest committed step.
#
#   bash launch/train_single_node.sh [NPROC] [launch/train.py flags...]
#   bash launch/train_single_node.sh 4 --steps 100 --save-every 10 --log-json runs/gpt.jsonl
#
# NPROC defaults to the number of GPUs, or 4 ranks on CPU (gloo). The checkpoint root
# is $CKPT_DIR (default runs/gpt) unless --ckpt-dir is given. Run it again after a
# crash, with the same or another NPROC, and training continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS="$(python3 -c 'import torch; print(torch.cuda.device_count())')"
NPROC="${1:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 4)}"
[ $# -gt 0 ] && shift
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --standalone --nproc-per-node "$NPROC" launch/train.py --ckpt-dir "${CKPT_DIR:-runs/gpt}" "$@"
