#!/usr/bin/env bash
# Sweep the imbalance ratio: train CE and LA at each rho and seed, evaluate (CE raw and post-hoc tau=1, LA raw),
# and tabulate beside the published numbers in $RESULTS/{dataset}_rho_sweep.{md,csv,png}.
#
#   bash scripts/sweep_rho.sh                                         # CIFAR-10-LT, rho 200 100 50 10, seed 0
#   LOSSES="ce la wnorm ldam ldam-drw" RHOS=100 bash scripts/sweep_rho.sh   # the paper's Table 3 column
#   DATASET=cifar100 SEEDS="0 1 2" NPROC=2 bash scripts/sweep_rho.sh
#   EPOCHS=20 EXTRA="--set train.eval_every=5" bash scripts/sweep_rho.sh   # shortened (and labelled so)
#   PARALLEL=8 bash scripts/sweep_rho.sh                              # 8 runs at once on one GPU
#
# Re-running after an interruption continues where it stopped: finished runs are skipped, started ones resumed.
# Every knob is an environment variable; EXTRA is split on spaces, so its values cannot contain spaces.
set -euo pipefail

DATASET=${DATASET:-cifar10}
RHOS=${RHOS:-"200 100 50 10"}
EPOCHS=${EPOCHS:-}          # empty: the recipe's
NPROC=${NPROC:-1}           # processes (GPUs) per run; >1 launches through torchrun
SEEDS=${SEEDS:-0}
LOSSES=${LOSSES:-"ce la"}   # what to train: ce, la, ldam, and any of them with -drw (deferred re-weighting);
                            # wnorm adds post-hoc weight normalisation (T = 1) of the ce runs to the table
DATA_ROOT=${DATA_ROOT:-}    # empty: $LA_DATA_ROOT, else the recipe's data.root
CONFIG=${CONFIG:-}          # empty: configs/paper_$DATASET.yaml when it exists, else train.py's default
OUT=${OUT:-runs/sweep_${DATASET}}
RESULTS=${RESULTS:-results}
PYTHON=${PYTHON:-python}
EXTRA=${EXTRA:-}            # more train.py flags, e.g. "--set train.eval_every=10"
PARALLEL=${PARALLEL:-1}     # runs trained at the same time (separate processes sharing the device)
MPS=${MPS:-auto}            # with PARALLEL > 1 on an NVIDIA GPU: auto starts CUDA MPS where it can, 0 never
TIME_LIMIT=${TIME_LIMIT:-}  # seconds from the start: training still running then stops (saving a checkpoint),
                            # the rest is tabulated; running this again resumes. Empty: no limit

# Paths the user gives stay relative to where they run this; only our own files are found through REPO.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z $CONFIG && -f $REPO/configs/paper_${DATASET}.yaml ]]; then
    CONFIG=$REPO/configs/paper_${DATASET}.yaml
fi
# What the table's header calls the recipe: EXTRA may change what is learned, so it is named too.
RECIPE="${CONFIG:-the default recipe of train.py}"
RECIPE="${RECIPE#"$REPO"/}${EXTRA:+ with $EXTRA}"

# Flags shared by every training run; the per-run ones (--rho, --loss, --seed, --out) are added later.
read -r -a extra <<< "$EXTRA"
common=(--dataset "$DATASET")
[[ -n $CONFIG ]] && common+=(--config "$CONFIG")
[[ -n $EPOCHS ]] && common+=(--epochs "$EPOCHS")
[[ -n $DATA_ROOT ]] && common+=(--data-root "$DATA_ROOT")
common+=("${extra[@]}")
eval_flags=()
[[ -n $DATA_ROOT ]] && eval_flags+=(--data-root "$DATA_ROOT")

if ! [[ $PARALLEL =~ ^[1-9][0-9]*$ ]]; then echo "PARALLEL must be a positive integer, not '$PARALLEL'" >&2; exit 2; fi
trained=()  # the methods to train, in LOSSES order
for method in $LOSSES; do
    case $method in
        ce|la|ldam|ce-drw|la-drw|ldam-drw) trained+=("$method") ;;
        wnorm) [[ " $LOSSES " == *" ce "* ]] || { echo "LOSSES: wnorm re-evaluates the ce runs, so it needs ce too" >&2; exit 2; } ;;
        *) echo "LOSSES: unknown '$method'; use ce, la, ldam (each optionally with -drw) and wnorm" >&2; exit 2 ;;
    esac
done
wnorm=()
[[ " $LOSSES " == *" wnorm "* ]] && wnorm=(--wnorm-tau 1)
if (( PARALLEL > 1 )); then
    # K processes each taking every core would fight over them; a CPU run's floats can depend on its thread
    # count, so compare CPU runs only at equal OMP_NUM_THREADS
    : "${OMP_NUM_THREADS:=$(( $(nproc) / PARALLEL > 0 ? $(nproc) / PARALLEL : 1 ))}"
    export OMP_NUM_THREADS
    source "$REPO/scripts/mps.sh"
    [[ $MPS == 0 ]] || mps_start
fi

launcher=("$PYTHON")
# torchrun's own module, so the launcher and the workers use $PYTHON's torch
(( NPROC > 1 )) && launcher=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")
if [[ -n $TIME_LIMIT ]]; then
    [[ $TIME_LIMIT =~ ^[1-9][0-9]*$ ]] || { echo "TIME_LIMIT must be a number of seconds, not '$TIME_LIMIT'" >&2; exit 2; }
    DEADLINE=$(( SECONDS + TIME_LIMIT ))
fi

train() {  # method rho seed; exit status 124 when TIME_LIMIT stopped it
    local dir=$OUT/rho${2}_${1}_s${3} resume=() limit=() loss=(--loss "${1%-drw}")
    [[ $1 == *-drw ]] && loss+=(--drw)
    # train.py --resume finishes a started run, does nothing for a finished one and refuses one that trained
    # more epochs than asked; a directory without a checkpoint holds nothing to keep.
    if [[ -f $dir/checkpoint.pt ]]; then resume=(--resume); elif [[ -d $dir ]]; then resume=(--overwrite); fi
    if [[ -n $TIME_LIMIT ]]; then
        (( DEADLINE - SECONDS > 0 )) || return 124
        # SIGTERM: train.py finishes its step, saves and exits; timeout then exits 124
        limit=(timeout --kill-after=60 $(( DEADLINE - SECONDS )))
    fi
    echo "== $dir: training${resume:+ (${resume[*]})}"
    "${limit[@]}" "${launcher[@]}" "$REPO/train.py" "${common[@]}" --rho "$2" "${loss[@]}" --seed "$3" --out "$dir" "${resume[@]}"
}

evaluate() {  # method rho seed; always rerun: logits are cached per checkpoint, so this is cheap
    local dir=$OUT/rho${2}_${1}_s${3} posthoc=()
    [[ $1 == ce ]] && posthoc=(--posthoc --tau 1 "${wnorm[@]}")  # post-hoc adjustments only of the plain-CE model
    echo "== $dir: evaluating (full report in $dir/eval.log)"
    "$PYTHON" "$REPO/eval.py" "$dir" "${posthoc[@]}" "${eval_flags[@]}" > "$dir/eval.log"
}

one_run() {  # method rho seed
    local rc=0
    train "$@" || rc=$?
    if (( rc == 124 )); then
        echo "== rho${2}_${1}_s${3}: stopped by TIME_LIMIT=$TIME_LIMIT s, not evaluated; run this again to continue it"
        return 0
    fi
    (( rc == 0 )) && evaluate "$@"
}

# plain if/else rather than a quote nested in ${EPOCHS:-...}, which once printed a stray backslash
if [[ -n $EPOCHS ]]; then epochs_said="$EPOCHS epochs"; else epochs_said="the recipe's epochs"; fi
echo "sweep: $DATASET, ${trained[*]}, rho $RHOS, seeds $SEEDS, $epochs_said, $RECIPE, $NPROC process(es) per run, $PARALLEL run(s) at once, into $OUT"
mkdir -p "$OUT"
# One sweep per OUT at a time: train.py refuses a run another process trains, but a second sweep would stop at
# the first such run. The flock lasts while this shell or a train.py it started lives, however they end.
exec 9<>"$OUT/.sweep.lock"
if ! flock -n 9; then
    echo "another sweep is running into $OUT ($(cat "$OUT/.sweep.lock")); wait for it to end, or pass another OUT" >&2
    exit 1
fi
echo "pid $$ on host ${HOSTNAME:-$(uname -n)} since $(date '+%Y-%m-%d %H:%M:%S %Z')" > "$OUT/.sweep.lock"
running=0 failed=0
for rho in $RHOS; do
    for seed in $SEEDS; do
        for loss in "${trained[@]}"; do
            if (( PARALLEL == 1 )); then  # a failed run is counted and the sweep goes on, as with PARALLEL > 1
                one_run "$loss" "$rho" "$seed" || failed=$((failed + 1))
                continue
            fi
            if (( running == PARALLEL )); then  # wait for a slot
                wait -n || failed=$((failed + 1))
                running=$((running - 1))
            fi
            log=$OUT/rho${rho}_${loss}_s${seed}.log
            echo "== rho${rho}_${loss}_s${seed}: started, log in $log"
            one_run "$loss" "$rho" "$seed" > "$log" 2>&1 &
            running=$((running + 1))
        done
    done
done
while (( running > 0 )); do
    wait -n || failed=$((failed + 1))
    running=$((running - 1))
done
if (( failed )); then
    if (( PARALLEL > 1 )); then where="the .log files in $OUT"; else where="their output above"; fi
    echo "$failed run(s) failed; see $where (re-running this command resumes them)" >&2
    exit 1
fi

"$PYTHON" "$REPO/scripts/sweep_table.py" --dataset "$DATASET" --runs "$OUT" --rhos "$RHOS" --seeds "$SEEDS" \
    --methods "$LOSSES" --out "$RESULTS" --config "$RECIPE"
