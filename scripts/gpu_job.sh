#!/usr/bin/env bash
# One job on a bare GPU machine, from packed data to one archive: unpack CIFAR-10, optionally benchmark, train
# a rho sweep several runs at a time (scripts/sweep_rho.sh with PARALLEL), evaluate and tabulate, and pack
# every run's config.yaml, split.json, runtime.json, metrics.jsonl, eval.json and logs, the table and the
# benchmark into $ARCHIVE_DIR/results.tar.gz. No checkpoint goes in (a ResNet-34 one is 170 MB) unless
# CHECKPOINTS=1, for runs longer than one command: each run's checkpoint.pt and provenance.json go in too (a
# ResNet-32 run's are a few MB), and RESUME_FROM=<that archive>, brought along to the next command, unpacks them
# into WORK first, so that the sweep resumes the runs where they stopped (and skips the finished ones).
#
#   ARCHIVE_DIR=$OUT PACK=.gpu/device PARALLEL=8 RHOS=100 bash scripts/gpu_job.sh
#   ARCHIVE_DIR=$OUT PACK=.gpu/device PARALLEL=8 RHOS=100 SEEDS="0 1" LOSSES="ce la wnorm ldam ldam-drw" bash scripts/gpu_job.sh
#   ARCHIVE_DIR=$OUT PACK=.gpu/device BENCH="--concurrent 1 2 4 8" RHOS= bash scripts/gpu_job.sh   # benchmark only
#   ARCHIVE_DIR=$OUT PACK=.gpu/device CONFIG=configs/seed_cifar10.yaml EXTRA="--set model.bn_batch=16" \
#       PARALLEL=8 TIME_LIMIT=540 bash scripts/gpu_job.sh
#   # the authors' recipe (1,241 epochs), CE and LA over two commands, the first archive carried to the second:
#   ARCHIVE_DIR=$OUT PACK=.gpu/device CONFIG=configs/official_cifar10.yaml RHOS=100 PARALLEL=2 TIME_LIMIT=540 \
#       CHECKPOINTS=1 bash scripts/gpu_job.sh
#   ... the same with RESUME_FROM=.gpu/prev/results.tar.gz
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
CHECKPOINTS=${CHECKPOINTS:-0}       # 1: pack each run's checkpoint.pt and provenance.json too
RESUME_FROM=${RESUME_FROM:-}        # an earlier call's results.tar.gz (CHECKPOINTS=1) to continue from
export RHOS=${RHOS-"200 100 50 10"}  # empty: no training
export PYTHON=${PYTHON:-python3} DATA_ROOT OUT=$WORK/runs RESULTS=$WORK MPS=${MPS:-auto}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ ! -f $DATA_ROOT/cifar-10-batches-py/test_batch ]]; then
    [[ -n $PACK ]] || { echo "no CIFAR-10 under $DATA_ROOT: set DATA_ROOT to it, or PACK to a folder with unpack.py" >&2; exit 2; }
    flags=()
    [[ " $RHOS " == *" 10 "* ]] || flags=(--no-extra)
    "$PYTHON" "$PACK/unpack.py" "$DATA_ROOT" "${flags[@]}"
fi
[[ $CHECKPOINTS == [01] ]] || { echo "CHECKPOINTS must be 0 or 1, not '$CHECKPOINTS'" >&2; exit 2; }
if [[ -n $RESUME_FROM ]]; then
    [[ -f $RESUME_FROM ]] || { echo "RESUME_FROM: no archive at $RESUME_FROM" >&2; exit 2; }
    resumed=$(tar tzf "$RESUME_FROM" | grep -c '/checkpoint\.pt$' || true)
    (( resumed > 0 )) || { echo "RESUME_FROM: $RESUME_FROM holds no checkpoint (was it packed with CHECKPOINTS=1?)" >&2; exit 2; }
fi
mkdir -p "$ARCHIVE_DIR" "$WORK"
if [[ -n $RESUME_FROM ]]; then
    tar xzf "$RESUME_FROM" -C "$WORK"
    echo "gpu_job: continuing from $RESUME_FROM ($resumed checkpoint(s))"
fi
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

kept=()
(( CHECKPOINTS )) && kept=(-o -name checkpoint.pt -o -name provenance.json)
(cd "$WORK" && find . -type f \( -name config.yaml -o -name split.json -o -name runtime.json -o -name metrics.jsonl \
    -o -name eval.json -o -name '*.log' -o -name '*_rho_sweep.*' -o -name 'bench*.json' -o -name '*.png' "${kept[@]}" \) \
    -print0 | sort -z | tar czf "$ARCHIVE_DIR/results.tar.gz" --null -T -)
echo "packed $(tar tzf "$ARCHIVE_DIR/results.tar.gz" | wc -l) files into $ARCHIVE_DIR/results.tar.gz ($(du -h "$ARCHIVE_DIR/results.tar.gz" | cut -f1))"
exit "$status"
