"""train.precision=auto and train.compile=auto on a CPU: time the real training step in each candidate, keep the faster.

Which precision is fast is not written in the CPU's flags: bf16 was the fast kind on one Intel Xeon,
and the slow kind on a Xeon that reports the AVX-512 bf16 flag without AMX (docs/benchmark-log.md).
So `auto` measures, once per machine and model:

- precision: a few steps in fp32 and in bf16 (where bf16 autocast runs at all), eager; bf16 is kept only
  where it is faster by more than MARGIN (it also costs a little accuracy);
- compile: the compiled step against the eager one at the chosen precision, after warm-up, kept only where
  faster by more than MARGIN; not even tried where the run's eager training time left is under
  COMPILE_MIN_RUN_S (compiling costs about a minute and a half per start here: a short run would pay for it
  and never earn it back).

The steps are taken on the run's own model, optimizer and first batch; the model's and optimizer's state and
the random number generators are restored afterwards, so the run is the one an explicit setting would train.
Timings are cached per machine and model (`cache_file()`), so later runs start at once. On CUDA nothing is
measured: bf16 where supported, no compile, the CUDA graph (la.runtime's static rules).
"""
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from la import dist, hardware
from la.runtime import Runtime, resolve_compile, resolve_cuda_graph, resolve_precision

MARGIN = 0.05             # a candidate must be this much faster per step to replace the simpler one
COMPILE_MIN_RUN_S = 900   # eager training seconds left below which compiling is not tried
WARMUP_STEPS, TIMED_STEPS = 2, 5


# ---------------------------------------------------------------- the decisions, from timings alone

def pick_precision(timings):
    """fp32 unless bf16 is measurably faster."""
    if "bf16" in timings and timings["bf16"] < timings["fp32"] * (1 - MARGIN):
        return "bf16"
    return "fp32"


def pick_compile(eager, compiled):
    return compiled < eager * (1 - MARGIN)


# ---------------------------------------------------------------- the cache

def cache_file():
    root = os.environ.get("LA_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "logit-adjustment"
    return Path(root) / "autotune.json"


def cache_key(model_cfg, per_rank_batch, channels_last, world_size, compile_mode="default", task="", image_size=32):
    """Everything a step's time depends on: machine, torch, threads, processes, network, batch, image size (a
    224 px step is some fifty 32 px ones), memory format, torch.compile's mode, and task (the number of classes
    and the loss: a cosine head and LDAM's margins are another step)."""
    return " | ".join([hardware.cpu_name(), f"torch {torch.__version__}", f"{torch.get_num_threads()} threads",
                       f"{world_size} process(es)", model_cfg.name, f"bn_batch {model_cfg.bn_batch}",
                       f"batch {per_rank_batch}", f"{image_size} px", "channels_last" if channels_last else "nchw",
                       f"compile_mode {compile_mode}"] + ([task] if task else []))


def read_cache(key):
    try:
        return dict(json.loads(cache_file().read_text()).get(key, {}))
    except (OSError, ValueError, AttributeError):
        return {}  # no cache or an unreadable one: measure again


def write_cache(key, timings):
    path = cache_file()
    try:
        entries = json.loads(path.read_text()) if path.is_file() else {}
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        entries = {}
    entries[key] = timings
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the next run measures again


# ---------------------------------------------------------------- measuring

class Probe:
    """Times training steps on the run's own objects and puts everything back afterwards.

    step_for(model, precision) -> an eager training step (x, y) -> (loss, logits) of that model at that precision;
    first_batch() -> (x, y).
    """

    def __init__(self, model, raw_model, optimizer, first_batch, step_for):
        self.model, self.raw_model, self.optimizer = model, raw_model, optimizer
        self.first_batch, self.step_for = first_batch, step_for

    def seconds_per_step(self, prec, model=None):
        """Median seconds of TIMED_STEPS steps after WARMUP_STEPS (a compiled model compiles in its first)."""
        x, y = self.first_batch()
        step = self.step_for(self.model if model is None else model, prec)
        saved = copy.deepcopy((self.raw_model.state_dict(), self.optimizer.state_dict()))
        times = []
        with torch.random.fork_rng(devices=[]):
            for i in range(WARMUP_STEPS + TIMED_STEPS):
                t0 = time.perf_counter()
                step(x, y)
                if i >= WARMUP_STEPS:
                    times.append(time.perf_counter() - t0)
        self.raw_model.load_state_dict(saved[0])  # in place: a compiled model's guards still hold
        self.optimizer.load_state_dict(saved[1])
        self.optimizer.zero_grad(set_to_none=True)
        return statistics.median(times)


def _agree(values, keys, ctx):
    """Every rank's timings summed and averaged, so all ranks take the same decision."""
    if not ctx.distributed:
        return values
    t = dist.all_reduce_sum(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=ctx.device)).cpu()
    return {k: float(v) / ctx.world_size for k, v in zip(keys, t)}


AS_STARTED = "as the run started"
KEYS = ("fp32", "bf16", "compiled_fp32", "compiled_bf16")  # eager and compiled seconds per step, per precision


def _main_cache(key, ctx):
    """Rank 0's cache entry on every rank (ranks on other nodes may have other caches, or none)."""
    entry = read_cache(key) if ctx.is_main else {}
    if not ctx.distributed:
        return {k: float(v) for k, v in entry.items() if k in KEYS}
    t = torch.tensor([float(entry.get(k, -1.0)) if ctx.is_main else 0.0 for k in KEYS], dtype=torch.float64, device=ctx.device)
    t = dist.all_reduce_sum(t).cpu()
    return {k: float(v) for k, v in zip(KEYS, t) if v >= 0}


def choose(tc, model_cfg, ctx, probe, compile_model, steps_left, saved=None, timer=None, task="", image_size=32):
    """(Runtime of this run, the model compiled if it trains compiled, else None).

    tc: the config's train section; probe: a Probe; compile_model: () -> the compiled model; steps_left:
    training steps this process will take; saved: the Runtime dict of a checkpoint being resumed;
    timer: (precision, compiled model or None) -> seconds per step, in place of the probe (tests plant timings);
    task: the classes and loss, and image_size: the training images' side in pixels, for the cache key.
    """
    # a cuda_graph=true that cannot work is refused before anything is measured
    resolve_cuda_graph(tc.cuda_graph, ctx.device, ctx.world_size, resolve_compile(tc.compile, ctx.device))
    if saved and saved.get("device", ctx.device.type) != ctx.device.type:
        saved = None  # moved to another kind of device: decide afresh for this one
    if saved:  # a resumed run trains as it started; explicit settings still win (compile may change on resume)
        prec = saved["precision"] if tc.precision == "auto" else tc.precision
        use_compile = saved["compile"] if tc.compile == "auto" else tc.compile == "true"
        why = {k: _as_started(saved.get("why", {}).get(k)) for k in ("precision", "compile") if getattr(tc, k) == "auto"}
        return _finish(tc, ctx, prec, use_compile, why, saved.get("seconds_per_step", {}), compile_model)
    if ctx.device.type != "cpu" or (tc.precision != "auto" and tc.compile != "auto"):
        why = {k: "auto" for k in ("precision", "compile") if getattr(tc, k) == "auto"}
        return _finish(tc, ctx, resolve_precision(tc.precision, ctx.device),
                       resolve_compile(tc.compile, ctx.device), why, {}, compile_model)

    measure = timer or probe.seconds_per_step
    key = cache_key(model_cfg, tc.batch_size // ctx.world_size, tc.channels_last, ctx.world_size, tc.compile_mode, task,
                    image_size)
    timings, measured, why = _main_cache(key, ctx), [], {}

    def get(name, prec, model=None):  # seconds per step, from the cache or measured now (on every rank)
        if name not in timings:
            timings[name] = _agree({name: measure(prec, model)}, [name], ctx)[name]
            measured.append(name)
        return timings[name]

    def said(names, labels=None):
        how = "measured" if set(names) & set(measured) else "cached"
        return f"auto, {how}: " + ", ".join(f"{label} {timings[n]:.3g} s/step" for n, label in zip(names, labels or names))

    prec = tc.precision
    if prec == "auto":
        candidates = ["fp32"] + (["bf16"] if hardware.cpu_runs_bf16() else [])
        prec = pick_precision({c: get(c, c) for c in candidates})
        why["precision"] = said(candidates)
    compiled = None
    if tc.compile != "auto":
        use_compile = tc.compile == "true"
    elif hardware.cxx_compiler() is None:
        use_compile, why["compile"] = False, "auto: no C++ compiler"
    elif f"compiled_{prec}" not in timings and (left := get(prec, prec) * steps_left) < COMPILE_MIN_RUN_S:
        use_compile = False
        why["compile"] = f"auto: {f'{left:.0f} s' if left < 120 else f'{left / 60:.0f} min'} of eager training left, too short to compile for"
    else:
        if f"compiled_{prec}" not in timings:
            compiled = compile_model()
        use_compile = pick_compile(get(prec, prec), get(f"compiled_{prec}", prec, compiled))
        why["compile"] = said([prec, f"compiled_{prec}"], ["eager", "compiled"])
    if ctx.is_main and measured:
        write_cache(key, timings)
    if use_compile and compiled is None:
        compiled = compile_model()
    return Runtime(ctx.device, prec, use_compile, False, tc.channels_last, why, timings), compiled if use_compile else None


def _as_started(reason):
    """A resumed run's reason for a setting: the one it started with, kept through any number of resumes."""
    if not reason:  # the run started with an explicit setting
        return AS_STARTED
    if reason.startswith(AS_STARTED):  # resumed before: the reason already carries the prefix
        return reason
    return f"{AS_STARTED}: {reason}"


def _finish(tc, ctx, prec, use_compile, why, timings, compile_model):
    graph = resolve_cuda_graph(tc.cuda_graph, ctx.device, ctx.world_size, use_compile)
    return Runtime(ctx.device, prec, use_compile, graph, tc.channels_last, why, timings), (compile_model() if use_compile else None)
