#!/usr/bin/env bash
# Train on several nodes: run this once on every node, with the same settings.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#       bash launch/train_multi_node.sh --ckpt-dir /shared/runs/gpt --steps 1000
#
# Rendezvous is torchrun's c10d backend at MASTER_ADDR:MASTER_PORT (the node whose
# address that is hosts it; set RDZV_IS_HOST=1/0 to say so explicitly, e.g. when all
# "nodes" share one machine - see launch/two_nodes_local.sh). LOCAL_ADDR is the
# address this node is reached at (default: its hostname). The checkpoint root must be
# shared by all nodes (a shared filesystem or an object store URL such as s3://...).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(python3 -c 'import torch; print(torch.cuda.device_count() or 2)')}"
RDZV_CONF="join_timeout=${RDZV_JOIN_TIMEOUT_S:-300}"
[ -n "${RDZV_IS_HOST:-}" ] && RDZV_CONF="$RDZV_CONF,is_host=$RDZV_IS_HOST"
LOCAL_ADDR_FLAG=()
[ -n "${LOCAL_ADDR:-}" ] && LOCAL_ADDR_FLAG=(--local-addr "$LOCAL_ADDR")
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-shardckpt-gpt}" \
    --rdzv-conf "$RDZV_CONF" "${LOCAL_ADDR_FLAG[@]}" launch/train.py "$@"
