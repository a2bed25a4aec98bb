"""What this machine offers: its CPU's name and flags, whether bf16 autocast runs, a C++ compiler for torch.compile.
Facts only; what a run does with them is decided in la.runtime (static rules) and la.autotune (measured on a CPU)."""
import functools
import os
import platform
import shutil

import torch


def _cpuinfo_lines():
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def cpu_flags():
    """Every flag /proc/cpuinfo lists for the first CPU (empty where there is no /proc/cpuinfo)."""
    return next((l.split(":", 1)[1].split() for l in _cpuinfo_lines() if l.startswith("flags")), [])


def cpu_has_bf16():
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def cpu_name():
    names = [l.split(":", 1)[1].strip() for l in _cpuinfo_lines() if l.startswith("model name")]
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


def cxx_compiler():
    """The C++ compiler torch.compile's CPU backend would use, or None."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next(filter(None, map(shutil.which, names)), None)
