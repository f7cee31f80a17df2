#!/usr/bin/env bash
# The fast recovery tier on two simulated nodes x 2 ranks (two torchrun agents on
# 127.0.0.1, SHARDCKPT_NODE_ID=node0/node1, each "node" with its own local_dir):
#   1. a reference run trains STEPS steps untouched;
#   2. a second run saves a local step every LOCAL_EVERY steps (one copy on the other node)
#      and a durable one every DURABLE_EVERY; after step DIE_AT node0's ranks SIGKILL
#      themselves, the rest of the job is killed, and node0's local_dir is wiped;
#   3. the job restarts on both nodes: it prints which tier it restored from, the step, the
#      restore time against a durable restore, and trains on to STEPS;
#   4. the losses after the restart are compared with the reference, bit for bit.
# It exits non-zero, saying why, when a node fails, when the restart restores anything but
# the newest local step (the last multiple of LOCAL_EVERY up to DIE_AT: EXPECT, default
# "local:<that step>"), or when a loss differs from the reference's.
#
#   bash launch/recovery_demo.sh [OUT_DIR]   (default runs/recovery_demo; emptied first if a launch script made it, else refused)
#   STEPS=12 LOCAL_EVERY=2 DURABLE_EVERY=5 DIE_AT=9 HIDDEN=512 bash launch/recovery_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/recovery_demo}"
STEPS="${STEPS:-12}" LOCAL_EVERY="${LOCAL_EVERY:-2}" DURABLE_EVERY="${DURABLE_EVERY:-5}"
DIE_AT="${DIE_AT:-9}" HIDDEN="${HIDDEN:-512}"
EXPECT="${EXPECT:-local:$((DIE_AT / LOCAL_EVERY * LOCAL_EVERY))}"
source launch/fresh_out.sh && fresh_out "$OUT"  # never empties a folder it did not make
export OMP_NUM_THREADS=1

# run NAME [extra args]: both nodes of one job, in the background, each in its own session
# (so a node can be killed as a whole); node pids in NODE_PIDS.
run() {
    local name=$1; shift
    local port
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    NODE_PIDS=()
    for node in 0 1; do
        SHARDCKPT_NODE_ID="node$node" setsid torchrun --nnodes 2 --node-rank $node --nproc-per-node 2 \
            --master-addr 127.0.0.1 --master-port "$port" launch/recovery_demo.py \
            --durable "$OUT/$name/durable" --local-dir "$OUT/$name/local/node$node" --steps "$STEPS" \
            --local-every "$LOCAL_EVERY" --durable-every "$DURABLE_EVERY" --hidden "$HIDDEN" \
            --log-json "$OUT/$name.jsonl" "$@" >>"$OUT/$name.node$node.out" 2>&1 &
        NODE_PIDS[$node]=$!
    done
}

# wait_nodes: both nodes' exit status (a bare `wait A B` reports only B's).
wait_nodes() {
    local status=0
    wait "${NODE_PIDS[0]}" || status=$?
    wait "${NODE_PIDS[1]}" || status=$?
    if [ "$status" != 0 ]; then
        echo "FAILED: a node of the job exited with status $status; see $OUT/*.out" >&2
        tail -n 5 "$OUT"/*.out >&2
        exit "$status"
    fi
}

echo "== reference: $STEPS steps, no failure"
run reference
wait_nodes

echo "== run: node0 is killed after step $DIE_AT"
run job --die-at "$DIE_AT"
{ wait "${NODE_PIDS[0]}" || true; } 2>/dev/null       # node0's ranks SIGKILLed themselves
kill -KILL -- "-${NODE_PIDS[1]}" 2>/dev/null || true  # the scheduler ends the rest of the job
{ wait "${NODE_PIDS[1]}" || true; } 2>/dev/null
grep -h '^\[recovery\]' "$OUT"/job.node0.out || true
echo "   what is left on disk:"
ls "$OUT/job/local/node0" "$OUT/job/local/node1" "$OUT/job/durable" | sed 's/^/   /'
rm -rf "$OUT/job/local/node0"                        # node0 came back with an empty RAM disk
for node in 0 1; do mv "$OUT/job.node$node.out" "$OUT/job.killed.node$node.out"; done
echo "== wiped $OUT/job/local/node0; restarting both nodes"

run job --expect "$EXPECT"
wait_nodes
grep -h '^\[recovery\]' "$OUT"/job.node0.out

python3 - "$OUT/reference.jsonl" "$OUT/job.jsonl" <<'PY'
import json, sys
ref = {r["step"]: r["loss"] for r in map(json.loads, open(sys.argv[1]))}
rows = [json.loads(line) for line in open(sys.argv[2])]
restart = next(i for i in range(1, len(rows)) if rows[i]["step"] <= rows[i - 1]["step"])
same = all(ref[r["step"]] == r["loss"] for r in rows)
print(f"trained steps 1-{rows[restart - 1]['step']}, then after the restart steps {rows[restart]['step']}-{rows[-1]['step']}; "
      f"every loss bitwise equal to the reference run's: {same}")
if not (same and rows[-1]["step"] == max(ref)):
    sys.exit("FAILED: the losses after the restart are not the reference run's, bit for bit")
PY
