"""What the hardware offers: bf16 autocast, a C++ compiler for torch.compile, CUDA graphs; and the static rules
`auto` follows where nothing is measured (on CUDA, and in eval.py). On a CPU, train.py measures instead
(la.autotune)."""
import contextlib
import functools
import os
import platform
import shutil

import torch

from la import UserError


def cpu_has_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine() or "unknown CPU"


@functools.lru_cache(maxsize=None)
def cpu_runs_bf16():
    """Whether bf16 autocast works on this CPU at all (fast or not: la.autotune measures that)."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1))
        return out.dtype == torch.bfloat16
    except (RuntimeError, TypeError):
        return False


def resolve(name, device):
    """The static rule: 'auto' -> 'bf16' on CUDA with bf16 or a CPU with AVX-512 bf16 / AMX, else 'fp32'."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(precision, device, cache=True):
    """bf16 autocast keeps parameters, batch-norm statistics and the loss in fp32; no grad scaler needed."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def cxx_compiler():
    """The C++ compiler torch.compile's CPU backend would use, or None."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next(filter(None, map(shutil.which, names)), None)


def resolve_compile(setting, device):
    """The static rule: 'auto' -> on for CPUs with a C++ compiler, off on CUDA, where train.cuda_graph replays
    the whole step instead (3.7x the eager loop on an H100, compile 1.11x on an H200)."""
    if setting != "auto":
        return setting == "true"
    return device.type == "cpu" and cxx_compiler() is not None


def resolve_cuda_graph(setting, device, world_size, compiled):
    """'auto' -> on for a single uncompiled process on CUDA (see la.engine.GraphedTrainStep), else off.
    'true' where it cannot work is the user's mistake, said in one line."""
    possible = device.type == "cuda" and world_size == 1 and not compiled
    if setting == "true" and not possible:
        why = ("needs a CUDA device" if device.type != "cuda" else
               "records one process's step; under torchrun leave it off" if world_size > 1 else
               "and train.compile both record the step; pick one")
        raise UserError(f"train.cuda_graph=true {why}")
    return possible and setting != "false"
