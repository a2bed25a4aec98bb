#!/usr/bin/env bash
# RESULTS.md's CIFAR-10-LT numbers: the paper recipe (ResNet-32, 200 epochs, rho=100, seed 0) with plain CE
# and with the LA loss, then every evaluation RESULTS.md reports. Re-running resumes or skips finished runs.
#
#   DATA_ROOT=/path/to/data bash scripts/reproduce_cifar10.sh
#   NPROC=8 bash scripts/reproduce_cifar10.sh            # the same global batch over 8 GPUs
set -euo pipefail
DATA_ROOT=${DATA_ROOT:-}    # empty: train.py's rule ($LA_DATA_ROOT, else ./data)
OUT=${OUT:-runs/paper_cifar10}
NPROC=${NPROC:-1}
PYTHON=${PYTHON:-python}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
root=()
[[ -n $DATA_ROOT ]] && root=(--data-root "$DATA_ROOT")

launch() {
    if (( NPROC > 1 )); then "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$@"; else "$PYTHON" "$@"; fi
}

for loss in ce la; do
    dir=$OUT/cifar10-lt_rho100_${loss}_s0
    resume=(); [[ -f $dir/checkpoint.pt ]] && resume=(--resume)
    # evaluating the test set every 10 epochs keeps it a small share of a CPU run; the last epoch is always evaluated
    launch "$REPO/train.py" "${root[@]}" --loss "$loss" --rho 100 --out "$dir" \
        --set train.eval_every=10 "${resume[@]}"
done
"$PYTHON" "$REPO/eval.py" "$OUT/cifar10-lt_rho100_ce_s0" --posthoc --tau 1 --tau-sweep "${root[@]}"
# LA raw, then post-hoc on top (t = 1: a total shift of 2) and the extra t chosen on validation
"$PYTHON" "$REPO/eval.py" "$OUT/cifar10-lt_rho100_la_s0" --posthoc --tau 1 --tau-sweep "${root[@]}"
"$PYTHON" "$REPO/eval.py" "$OUT/cifar10-lt_rho100_ce_s0" "$OUT/cifar10-lt_rho100_la_s0" --posthoc --tau 1 \
    --plot "$OUT/per_class.png" "${root[@]}"
