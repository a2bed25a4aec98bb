#!/usr/bin/env bash
# The GPU numbers in BENCHMARKS.md and RESULTS.md, in one go on one GPU:
#   1. scripts/bench.py on CUDA: (a) reference pipeline, (b) train.py's loop, (c) bare step, at the defaults
#      (each step replayed as one CUDA graph); then (b) and (c) eager, launched kernel by kernel
#   2. the paper recipe (ResNet-32, CE, CIFAR-10-LT rho=100, 200 epochs) alone on the GPU: the full-run time
#   3. the seed recipe (ResNet-34) with CE and with LA, side by side on the same GPU (so their wall
#      times are shared: a GPU this model leaves mostly idle runs two at nearly the speed of one)
#   4. eval.py on every finished run: CE raw, post-hoc tau=1, tau chosen on validation, oracle; LA raw; and
#      the seed recipe's per-class chart (CE, CE + post-hoc, LA)
#
#   DATA_ROOT=/path/to/data bash scripts/reproduce_gpu.sh
#   STEPS="3 4" DATA_ROOT=... bash scripts/reproduce_gpu.sh             # only some steps
#   EPOCHS=1 DEVICE=cpu DATA_ROOT=... bash scripts/reproduce_gpu.sh      # a dry run of every step
#
# TIME_LIMIT (seconds from the start, empty: none) stops any training still running then; a stopped run saves a checkpoint
# and continues with --resume. Finished runs are skipped on a re-run.
set -euo pipefail
DATA_ROOT=${DATA_ROOT:-}    # empty: train.py's rule ($LA_DATA_ROOT, else ./data)
OUT=${OUT:-runs/gpu}
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-}          # empty: the recipes' 200
TIME_LIMIT=${TIME_LIMIT:-}
BENCH=${BENCH:-"--windows 7 --window-steps 60 --warmup-steps 30"}
STEPS=${STEPS:-"1 2 3 4"}
STEP2=${STEP2:-}            # more train.py flags for step 2, e.g. "--set train.compile=true"
EXTRA=${EXTRA:-}            # more train.py flags for every run, e.g. "--set train.cuda_graph=false"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
START=$(date +%s)
mkdir -p "$OUT"

root=()
[[ -n $DATA_ROOT ]] && root=(--data-root "$DATA_ROOT")
common=("${root[@]}" --device "$DEVICE" --rho 100 ${EPOCHS:+--epochs "$EPOCHS"} $EXTRA)
left() {  # seconds of TIME_LIMIT left, or a day
    [[ -z $TIME_LIMIT ]] && { echo 86400; return; }
    local n=$(( TIME_LIMIT - ($(date +%s) - START) ))
    echo $(( n > 1 ? n : 1 ))  # timeout 0 would mean no limit
}
train() {  # run-name, then train.py flags; stopped by SIGTERM (it saves and exits) when TIME_LIMIT runs out
    local dir=$OUT/$1 resume=() t0 rc=0
    shift
    [[ -f $dir/checkpoint.pt ]] && resume=(--resume)
    t0=$(date +%s.%N)
    timeout --kill-after=60 "$(left)" "$PYTHON" "$REPO/train.py" "${common[@]}" --out "$dir" "$@" "${resume[@]}" \
        > "$dir.log" 2>&1 || rc=$?
    echo "$dir: exit $rc, $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s wall, $(grep -c . "$dir/metrics.jsonl" || true) epochs"
    (( rc == 0 )) || tail -3 "$dir.log"
}

step() { [[ " $STEPS " == *" $1 "* ]]; }

if step 1; then
echo "== 1. benchmark ($DEVICE)"
"$PYTHON" "$REPO/scripts/bench.py" --device "$DEVICE" "${root[@]}" $BENCH \
    --json "$OUT/bench_$DEVICE.json" || echo "bench failed: exit $?"
echo "-- (b) and (c) without the CUDA graph"
"$PYTHON" "$REPO/scripts/bench.py" --device "$DEVICE" "${root[@]}" $BENCH --skip-reference \
    --cuda-graph false --json "$OUT/bench_${DEVICE}_eager.json" || echo "bench failed: exit $?"
fi

if step 2; then
echo "== 2. paper recipe, CE, seed 0, alone on the device"
train r32_ce_s0 --loss ce --seed 0 $STEP2
fi

if step 3; then
echo "== 3. side by side: seed recipe CE and LA ($(left) s left)"
seed=(--config "$REPO/configs/seed_cifar10.yaml" --seed 0 --set train.save_every=20 --set train.eval_every=5)
train r34_ce_s0 "${seed[@]}" --loss ce &
train r34_la_s0 "${seed[@]}" --loss la &
wait
fi

step 4 || exit 0
echo "== 4. evaluation"
for dir in "$OUT"/*/; do
    dir=${dir%/}
    # only finished runs: a run stopped by TIME_LIMIT has a checkpoint but fewer metric lines than epochs
    [[ -f $dir/checkpoint.pt ]] && PYTHONPATH="$REPO" "$PYTHON" -m la.rundir finished "$dir" || continue
    flags=("${root[@]}")
    [[ $dir == *_ce_* ]] && flags+=(--posthoc --tau 1 --tau-sweep)
    echo "-- $dir"
    "$PYTHON" "$REPO/eval.py" "$dir" "${flags[@]}" || echo "eval failed: exit $?"
done
if [[ -f $OUT/r34_ce_s0/eval.json && -f $OUT/r34_la_s0/eval.json ]]; then  # both seed-recipe runs evaluated
    "$PYTHON" "$REPO/eval.py" "$OUT/r34_ce_s0" "$OUT/r34_la_s0" --posthoc --tau 1 "${root[@]}" \
        --plot "$OUT/per_class_seed.png" > /dev/null || echo "per-class chart failed: exit $?"
fi
echo "done in $(( $(date +%s) - START )) s"
