#!/usr/bin/env bash
# Two "nodes" on one machine over 127.0.0.1: two torchrun agents (--nnodes 2, node rank
# 0 and 1, 2 ranks each) meet through c10d rendezvous and train 4 ranks together, then
# the job is resumed on one node with 2 ranks from the last committed checkpoint.
#
#   bash launch/two_nodes_local.sh [OUT_DIR]   (default runs/two_nodes; emptied first if a launch script made it, else refused)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/two_nodes}"
source launch/fresh_out.sh && fresh_out "$OUT"  # never empties a folder it did not make
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
ARGS=(--ckpt-dir "$OUT/ckpt" --log-json "$OUT/log.jsonl" --steps 10 --save-every 5)
for node in 0 1; do
    NNODES=2 NODE_RANK=$node MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT NPROC_PER_NODE=2 LOCAL_ADDR=127.0.0.1 \
        RDZV_IS_HOST=$([ $node = 0 ] && echo 1 || echo 0) RDZV_ID="two-nodes-$PORT" \
        bash launch/train_multi_node.sh "${ARGS[@]}" >"$OUT/node$node.out" 2>&1 &
    pids[$node]=$!
done
status=0
for node in 0 1; do wait "${pids[$node]}" || { status=$?; echo "node $node failed (exit $status), see $OUT/node$node.out"; }; done
[ $status = 0 ] || exit $status
grep -h '^\[train\]' "$OUT"/node*.out
echo "2 nodes x 2 ranks finished: $(grep -c '"event": "step"' "$OUT/log.jsonl") steps logged"
# resume the same root on a single node with 2 ranks (4 -> 2) and train 5 more steps
bash launch/train_single_node.sh 2 "${ARGS[@]}" --steps 15 >"$OUT/resume.out" 2>&1
grep -h '^\[train\]' "$OUT/resume.out"
python3 - "$OUT/log.jsonl" <<'PY'
import json, sys
starts = [r for r in map(json.loads, open(sys.argv[1])) if r["event"] == "start"]
steps = [r for r in map(json.loads, open(sys.argv[1])) if r["event"] == "step"]
assert [s["world_size"] for s in starts] == [4, 2] and starts[1]["resumed_from"] == 10, starts
ids = [i for r in steps for i in r["sample_ids"]]
assert [r["step"] for r in steps] == list(range(1, 16)) and len(ids) == len(set(ids)), "a step or sample repeated or missing"
print(f"two nodes OK: steps 1-10 on 2 nodes x 2 ranks, 11-15 resumed on 1 node x 2 ranks, {len(ids)} distinct samples")
PY
