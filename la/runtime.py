"""How a run trains and evaluates: device, precision, compile, CUDA graph and memory format, decided once.

The decision is a Runtime, made by la.autotune.choose for training (measured on a CPU, the static rules here
elsewhere) and by `for_evaluation` for eval.py, then handed to the loader, the training step and evaluation
instead of each taking the settings one by one. It is recorded in runtime.json and the checkpoint.
"""
import contextlib
from dataclasses import dataclass, field

import torch

from la import UserError, hardware


@dataclass
class Runtime:
    device: torch.device
    precision: str = "fp32"                       # fp32 | bf16 (autocast; parameters and loss stay fp32)
    compile: bool = False
    cuda_graph: bool = False
    channels_last: bool = False
    why: dict = field(default_factory=dict)       # setting -> how it was decided, for the start-up line
    timings: dict = field(default_factory=dict)   # seconds per step of each candidate measured or cached

    def __post_init__(self):
        self.device = torch.device(self.device)

    def autocast(self, cache=True):
        return autocast(self.precision, self.device, cache)

    def to_dict(self):
        """What runtime.json and the checkpoint record (a resumed run trains as it started)."""
        return {"device": self.device.type, "precision": self.precision, "compile": self.compile,
                "cuda_graph": self.cuda_graph, "why": self.why, "seconds_per_step": self.timings}

    def describe(self):
        """'precision fp32 (auto: measured fp32 0.412 s/step, bf16 0.861 s/step)' and the like."""
        def part(name, value):
            why = self.why.get(name)
            return f"{name} {value}" + (f" ({why})" if why else "")
        return ", ".join([part("precision", self.precision), part("compile", "on" if self.compile else "off")]
                         + (["CUDA graph"] if self.cuda_graph else []))


def autocast(precision, device, cache=True):
    """bf16 autocast keeps parameters, batch-norm statistics and the loss in fp32; no grad scaler needed."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- the static rules (where nothing is measured)

def resolve_precision(name, device):
    """'auto' -> 'bf16' on CUDA with bf16 or a CPU with AVX-512 bf16 / AMX, else 'fp32'."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if hardware.cpu_has_bf16() else "fp32"


def resolve_compile(setting, device):
    """'auto' -> on for CPUs with a C++ compiler, off on CUDA, where train.cuda_graph replays the whole step
    instead (3.7x the eager loop on an H100, compile 1.11x on an H200)."""
    if setting != "auto":
        return setting == "true"
    return device.type == "cpu" and hardware.cxx_compiler() is not None


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


def for_evaluation(train_cfg, saved, device):
    """eval.py's Runtime: with precision 'auto', the precision the run trained in (la.autotune may have measured
    it) when evaluated on the same kind of device, else the static rule; never compiled or graphed."""
    saved = saved or {}
    same_device = saved.get("device") == device.type
    auto = train_cfg.precision == "auto" and same_device
    prec = saved["precision"] if auto else resolve_precision(train_cfg.precision, device)
    return Runtime(device, prec, channels_last=train_cfg.channels_last)


def recorded_runtime(ckpt, device):
    """The runtime dict a checkpoint records, for a resumed run to keep; for checkpoints from before la.autotune,
    what the static rules gave its settings."""
    train_cfg = ckpt["config"]["train"]
    return ckpt.get("runtime") or {"precision": resolve_precision(train_cfg["precision"], device),
                                   "compile": resolve_compile(train_cfg["compile"], device)}
