"""Pick bf16 autocast where the hardware runs it natively, else fp32."""
import contextlib

import torch


def cpu_has_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def resolve(name, device):
    """'auto' -> 'bf16' on CUDA with bf16 or a CPU with AVX-512 bf16 / AMX, else 'fp32'."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(precision, device):
    """bf16 autocast keeps parameters, batch-norm statistics and the loss in fp32; no grad scaler needed."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
