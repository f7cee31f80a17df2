#!/usr/bin/env bash
# The project's main job: real training that dies and resumes, checked against an
# uninterrupted run.
#
#   A. dropout 0.1 (per-rank RNG streams matter): 4 ranks crash (os._exit) after step 13,
#      resume on 4 ranks, are SIGKILLed after step 22, resume on 2 ranks and finish at 30.
#      Steps trained on 4 ranks must equal the uninterrupted 4-rank reference bit for bit;
#      after the 4 -> 2 resume every step must train on the same sample ids.
#   B. dropout 0 (no randomness in the math): 4 ranks SIGKILLed after step 17, resume on
#      3 ranks (uneven shards); same sample ids, losses within 1e-5 relative (float32 sums
#      in another order over 13 AdamW steps; measured ~1e-7).
#
# Usage: bash launch/main_job.sh [OUT_DIR]   (default runs/main_job; emptied first if a launch script made it, else refused)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
OUT="${1:-runs/main_job}"
source launch/fresh_out.sh && fresh_out "$OUT"  # never empties a folder it did not make
export OMP_NUM_THREADS=1
COMMON=(--steps 30 --save-every 5 --keep-last 2 --global-batch 12 --seed 0)
run() {  # run NPROC NAME [train.py flags...]: torchrun, output to $OUT/NAME.out, exit status kept
    local n="$1" name="$2"; shift 2
    local t0=$SECONDS rc=0
    torchrun --standalone --nproc-per-node "$n" launch/train.py "${COMMON[@]}" "$@" >"$OUT/$name.out" 2>&1 || rc=$?
    echo "  $name: $n ranks, exit $rc, $((SECONDS - t0)) s; $(grep -m1 '^\[train\]' "$OUT/$name.out" || true)"
}
start=$SECONDS
echo "== A: dropout 0.1, 4 ranks -> crash -> 4 ranks -> SIGKILL -> 2 ranks"
run 4 a_reference --dropout 0.1 --ckpt-dir "$OUT/a_reference" --log-json "$OUT/a_reference.jsonl"
run 4 a_attempt1 --dropout 0.1 --ckpt-dir "$OUT/a_ckpt" --log-json "$OUT/a_run.jsonl" --fail-at-step 13
run 4 a_attempt2 --dropout 0.1 --ckpt-dir "$OUT/a_ckpt" --log-json "$OUT/a_run.jsonl" --fail-at-step 22 --fail-how sigkill
run 2 a_attempt3 --dropout 0.1 --ckpt-dir "$OUT/a_ckpt" --log-json "$OUT/a_run.jsonl"
echo "== B: dropout 0, 4 ranks -> SIGKILL -> 3 ranks"
run 4 b_reference --dropout 0 --ckpt-dir "$OUT/b_reference" --log-json "$OUT/b_reference.jsonl"
run 4 b_attempt1 --dropout 0 --ckpt-dir "$OUT/b_ckpt" --log-json "$OUT/b_run.jsonl" --fail-at-step 17 --fail-how sigkill
run 3 b_attempt2 --dropout 0 --ckpt-dir "$OUT/b_ckpt" --log-json "$OUT/b_run.jsonl"
status=0
echo "== check A (4 -> 4 bitwise, 4 -> 2 same samples)"
python3 launch/train.py compare "$OUT/a_reference.jsonl" "$OUT/a_run.jsonl" | sed 's/^/  /' || status=1
echo "== check B (4 -> 3 same samples, losses within 1e-5)"
python3 launch/train.py compare "$OUT/b_reference.jsonl" "$OUT/b_run.jsonl" --loss-rtol 1e-5 | sed 's/^/  /' || status=1
echo "== committed checkpoints left in $OUT/a_ckpt (keep_last 2):"
shardckpt ls "$OUT/a_ckpt" 2>/dev/null | sed 's/^/  /' || ls "$OUT/a_ckpt"
echo "main job: $([ $status = 0 ] && echo PASSED || echo FAILED) in $((SECONDS - start)) s"
exit $status
