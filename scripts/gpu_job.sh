#!/usr/bin/env bash
# One job on a bare GPU machine, from packed data to one archive: unpack CIFAR-10, optionally benchmark, train
# a rho sweep several runs at a time (scripts/sweep_rho.sh with PARALLEL), evaluate and tabulate, and pack
# every run's config.yaml, split.json, runtime.json, metrics.jsonl, eval.json and logs, the table and the
# benchmark into $ARCHIVE_DIR/results.tar.gz. No checkpoint goes in (a ResNet-34 one is 170 MB).
#
#   ARCHIVE_DIR=$OUT PACK=.gpu/device PARALLEL=8 RHOS=100 bash scripts/gpu_job.sh
#   ARCHIVE_DIR=$OUT PACK=.gpu/device PARALLEL=8 RHOS=100 SEEDS="0 1" LOSSES="ce la wnorm ldam ldam-drw" bash scripts/gpu_job.sh
#   ARCHIVE_DIR=$OUT PACK=.gpu/device BENCH="--concurrent 1 2 4 8" RHOS= bash scripts/gpu_job.sh   # benchmark only
#   ARCHIVE_DIR=$OUT PACK=.gpu/device CONFIG=configs/seed_cifar10.yaml EXTRA="--set model.bn_batch=16" \
#       PARALLEL=8 TIME_LIMIT=540 bash scripts/gpu_job.sh
#
# PACK is a folder with unpack.py, which rebuilds cifar-10-batches-py/ under DATA_ROOT when it is not there
# (`python3 PACK/unpack.py DATA_ROOT [--no-extra]`: the images the rho = 10 subset adds are left out unless
# RHOS has 10). Every other variable (RHOS, SEEDS, LOSSES, CONFIG, EPOCHS, EXTRA, PARALLEL, TIME_LIMIT, DATASET) goes
# to sweep_rho.sh; TIME_LIMIT stops training in time to evaluate, tabulate and pack what finished.
#
# CUDA MPS (scripts/mps.sh; MPS=0: never): started once, here, when the sweep trains runs side by side
# (PARALLEL > 1) or bench.py measures them (--concurrent), so that the benchmark measures under the same daemon
# as the sweep it sizes; bench.json records which (`mps`). A daemon that cannot serve a CUDA client is stopped
# and both run without it.
set -euo pipefail
ARCHIVE_DIR=${ARCHIVE_DIR:?set ARCHIVE_DIR, the folder results.tar.gz goes to}
mkdir -p "$ARCHIVE_DIR"
ARCHIVE_DIR=$(cd "$ARCHIVE_DIR" && pwd)  # absolute: the archive is written from inside $WORK
DATA_ROOT=${DATA_ROOT:-${TMPDIR:-/tmp}/la-data}
PACK=${PACK:-}
WORK=${WORK:-runs/gpu_job}
BENCH=${BENCH:-}                    # bench.py flags; empty: no benchmark
export RHOS=${RHOS-"200 100 50 10"}  # empty: no training
export PYTHON=${PYTHON:-python3} DATA_ROOT OUT=$WORK/runs RESULTS=$WORK MPS=${MPS:-auto}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ ! -f $DATA_ROOT/cifar-10-batches-py/test_batch ]]; then
    [[ -n $PACK ]] || { echo "no CIFAR-10 under $DATA_ROOT: set DATA_ROOT to it, or PACK to a folder with unpack.py" >&2; exit 2; }
    flags=()
    [[ " $RHOS " == *" 10 "* ]] || flags=(--no-extra)
    "$PYTHON" "$PACK/unpack.py" "$DATA_ROOT" "${flags[@]}"
fi
mkdir -p "$WORK"
status=0
{
    rc=0
    echo "gpu_job: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'), $(nvidia-smi -L 2>/dev/null | head -1 || true)"
    if [[ $MPS != 0 ]] && { (( ${PARALLEL:-1} > 1 )) || [[ " $BENCH " == *" --concurrent "* ]]; }; then
        source "$REPO/scripts/mps.sh"
        mps_start  # in this group's shell: bench.py and sweep_rho.sh inherit the daemon, which stops when it exits
        (( MPS_ON )) || export MPS=0  # and the sweep does not try again what just failed
    fi
    if [[ -n $BENCH ]]; then
        # shellcheck disable=SC2086  # BENCH is a list of flags
        "$PYTHON" "$REPO/scripts/bench.py" --data-root "$DATA_ROOT" $BENCH --json "$WORK/bench.json" || { rc=$?; echo "bench.py failed: exit $rc"; }
    fi
    if [[ -n $RHOS ]]; then
        bash "$REPO/scripts/sweep_rho.sh" || { rc=$?; echo "sweep_rho.sh failed: exit $rc"; }
    fi
    exit "$rc"
} 2>&1 | tee "$WORK/job.log" || status=$?

(cd "$WORK" && find . -type f \( -name config.yaml -o -name split.json -o -name runtime.json -o -name metrics.jsonl \
    -o -name eval.json -o -name '*.log' -o -name '*_rho_sweep.*' -o -name 'bench*.json' -o -name '*.png' \) -print0 \
    | sort -z | tar czf "$ARCHIVE_DIR/results.tar.gz" --null -T -)
echo "packed $(tar tzf "$ARCHIVE_DIR/results.tar.gz" | wc -l) files into $ARCHIVE_DIR/results.tar.gz ($(du -h "$ARCHIVE_DIR/results.tar.gz" | cut -f1))"
exit "$status"
