# Sourced by scripts that train several runs at once on one NVIDIA GPU. mps_start starts a private CUDA MPS
# daemon, so the runs' kernels share the GPU's SMs at once instead of taking turns by time slice, and stops
# it when the script exits. Where MPS is missing or will not start (no NVIDIA GPU, no control binary, a
# container without the permissions), it says so and the runs share the GPU without it.

mps_start() {
    if ! { command -v nvidia-cuda-mps-control && nvidia-smi -L; } > /dev/null 2>&1; then
        echo "note: no NVIDIA GPU with CUDA MPS here; parallel runs share the device without it"
        return 0
    fi
    if [[ -n ${CUDA_MPS_PIPE_DIRECTORY:-} ]]; then
        echo "note: using the CUDA MPS daemon at $CUDA_MPS_PIPE_DIRECTORY"
        return 0
    fi
    local dir
    dir=$(mktemp -d "${TMPDIR:-/tmp}/la-mps.XXXXXX")
    export CUDA_MPS_PIPE_DIRECTORY=$dir/pipe CUDA_MPS_LOG_DIRECTORY=$dir/log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d 2> "$dir/start.err"; then
        echo "CUDA MPS started ($dir); stopped when this script exits"
        # shellcheck disable=SC2064  # $dir is expanded now, on purpose
        trap "echo quit | nvidia-cuda-mps-control > /dev/null 2>&1 || true; rm -rf '$dir'" EXIT
    else
        echo "note: CUDA MPS did not start ($(head -c 200 "$dir/start.err")); parallel runs share the device without it"
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        rm -rf "$dir"
    fi
}
