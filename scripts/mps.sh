# Sourced by scripts that train several runs at once on one NVIDIA GPU. mps_start starts a private CUDA MPS
# daemon, so the runs' kernels share the GPU's SMs at once instead of taking turns by time slice, and stops
# it when the script exits. Where MPS is missing or will not start (no NVIDIA GPU, no control binary, a
# container without the permissions), it says so and the runs share the GPU without it.
#
# The control daemon forking proves little: the MPS server starts lazily, at the first CUDA client, and in a
# container without shared IPC, or with a root/non-root mismatch between daemon and clients, that client is
# where it fails (and with it every run started under the daemon). So mps_start then probes with one short CUDA
# client ($PYTHON, torch); if the probe fails it stops the daemon, unsets its variables and says so.
# Afterwards MPS_ON is 1 when the runs go through the daemon, else 0. MPS_PROBE replaces the probe's command
# line (the tests plant one; on a CPU the torch probe always fails).

MPS_PROBE=${MPS_PROBE:-"${PYTHON:-python3} -c \"import torch; torch.ones(1, device='cuda').add_(1); torch.cuda.synchronize()\""}

mps_probe() {  # one short CUDA client, at most two minutes; its last lines of output
    timeout 120 bash -c "$MPS_PROBE" 2>&1 | tail -2
    return "${PIPESTATUS[0]}"
}

mps_stop() {  # the daemon at $1 (its folder)
    echo quit | CUDA_MPS_PIPE_DIRECTORY=$1/pipe CUDA_MPS_LOG_DIRECTORY=$1/log nvidia-cuda-mps-control > /dev/null 2>&1 || true
    rm -rf "$1"
}

mps_start() {
    MPS_ON=0
    if ! { command -v nvidia-cuda-mps-control && nvidia-smi -L; } > /dev/null 2>&1; then
        echo "note: no NVIDIA GPU with CUDA MPS here; parallel runs share the device without it"
        return 0
    fi
    if [[ -n ${CUDA_MPS_PIPE_DIRECTORY:-} ]]; then
        echo "note: using the CUDA MPS daemon at $CUDA_MPS_PIPE_DIRECTORY"
        MPS_ON=1
        return 0
    fi
    local dir why
    dir=$(mktemp -d "${TMPDIR:-/tmp}/la-mps.XXXXXX")
    export CUDA_MPS_PIPE_DIRECTORY=$dir/pipe CUDA_MPS_LOG_DIRECTORY=$dir/log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if ! nvidia-cuda-mps-control -d 2> "$dir/start.err"; then
        echo "note: CUDA MPS did not start ($(head -c 200 "$dir/start.err")); parallel runs share the device without it"
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        rm -rf "$dir"
        return 0
    fi
    if ! why=$(mps_probe); then
        mps_stop "$dir"
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        echo "note: the CUDA MPS daemon started but a CUDA client could not run under it ($(echo "$why" | tr '\n' ' ' | head -c 300)); stopped it, parallel runs share the device without it"
        return 0
    fi
    MPS_ON=1
    echo "CUDA MPS started ($dir), a CUDA client ran under it; stopped when this script exits"
    # shellcheck disable=SC2064  # $dir is expanded now, on purpose
    trap "mps_stop '$dir'" EXIT
}
