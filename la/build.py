"""The training objects of a recipe, built in one order by train.py, eval.py, scripts/bench.py and the tests:

    model -> device -> memory format -> optimizer and schedule -> resumed state -> DDP
          -> runtime (precision, compile, CUDA graph: la.autotune.choose) -> training step

so that a fix made here (compiling with static shapes, batch-norm groups, the cosine classifier) reaches every
caller at once.
"""
import fnmatch
import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from la import UserError, autotune, checkpoint, config, data, engine, losses, models
from la.runtime import Runtime, recorded_runtime


def lr_factor(step, steps_per_epoch, optim, epochs=None):
    """The learning rate of step `step` (counted from 0) as a fraction of optim.lr: a linear warm-up over
    warmup_epochs (per step or per epoch: optim.warmup_by), then optim.schedule: 'step', x gamma at each milestone
    epoch reached; 'cosine', (1 + cos(pi t)) / 2 with t the fraction of the post-warm-up steps of `epochs` done."""
    epoch = step // steps_per_epoch
    if epoch < optim.warmup_epochs:
        if optim.warmup_by == "epoch":
            return (epoch + 1) / optim.warmup_epochs
        return (step + (optim.warmup_by == "step")) / (optim.warmup_epochs * steps_per_epoch)
    if optim.schedule == "cosine":
        done = step - optim.warmup_epochs * steps_per_epoch
        return 0.5 * (1 + math.cos(math.pi * done / max(1, (epochs - optim.warmup_epochs) * steps_per_epoch)))
    return optim.gamma ** sum(epoch >= m for m in optim.milestones)


def model(cfg, n_classes, device, training=True):
    """The recipe's network on the device, in the memory format it trains in (train.channels_last); batch-norm
    groups (model.bn_batch) only for training."""
    net = models.from_config(cfg, n_classes, training).to(device)
    return net.to(memory_format=torch.channels_last) if cfg.train.channels_last else net


def decayed(net, patterns):
    """The names of net's parameters that weight decay applies to: those matching one of the space-separated
    fnmatch patterns (optim.decay_params). A pattern that matches no parameter is a UserError: a misspelt name
    would otherwise leave the decay off without a word."""
    names = [n for n, _ in net.named_parameters()]
    chosen = set()
    for pattern in patterns.split():
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise UserError(f"optim.decay_params: {pattern!r} matches no parameter of the model "
                            f"(its names look like {', '.join(names[:3])}, ..., {names[-1]})")
        chosen.update(hits)
    return chosen


def optimizer(cfg, net):
    """SGD with weight decay on the parameters optim.decay_params names: one parameter group when that is all of
    them (as every recipe before it had), else a decayed group and one without decay, in that order."""
    o = cfg.optim
    sgd = lambda groups: torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                         nesterov=o.nesterov)
    names = decayed(net, o.decay_params)
    params = list(net.named_parameters())
    if len(names) == len(params):
        return sgd(net.parameters())
    return sgd([{"params": [p for n, p in params if n in names]},
                {"params": [p for n, p in params if n not in names], "weight_decay": 0.0}])


def scheduler(cfg, opt, steps_per_epoch):
    """The recipe's learning-rate schedule, stepped once per training step (lr_factor)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps_per_epoch, cfg.optim, cfg.train.epochs))


def compiled(net, tc):
    """torch.compile with static shapes: one graph at the first step, one more for an epoch's short last batch; a
    dynamic-shape graph (what torch.compile makes after a second batch size) ran 7 % slower here."""
    if tc.compile == "auto":  # chosen for the user: if compiling fails, train uncompiled rather than stop
        torch._dynamo.config.suppress_errors = True
    return torch.compile(net, mode=tc.compile_mode, dynamic=False)


@dataclass
class Training:
    """Everything the training loop touches."""
    model: torch.nn.Module       # what the step calls: wrapped by DDP and/or compiled
    raw_model: torch.nn.Module   # the plain module: checkpoints and evaluation
    criterion: losses.Criterion
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    runtime: Runtime
    step: Callable               # (x, y) -> (loss, logits), detached


def training(cfg, ctx, counts, loader, ckpt=None):
    """The Training of a recipe on this process's device, seeded by train.seed. ckpt: a checkpoint being resumed;
    its weights, optimizer, schedule and RNG states are loaded before the runtime is chosen (la.autotune times
    steps on these very objects and puts them back), and the run keeps the runtime it started with."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    raw = model(cfg, len(counts), ctx.device)
    criterion = losses.from_config(cfg.loss, counts, ctx.device, ctx.world_size)
    opt = optimizer(cfg, raw)
    steps_per_epoch = loader.steps(0)
    sched = scheduler(cfg, opt, steps_per_epoch)
    start, saved = (0, 0), None
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        checkpoint.set_rng_state(ckpt["rng"])
        start, saved = (ckpt["epoch"], ckpt["step"]), recorded_runtime(ckpt, ctx.device)
    net = DDP(raw, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None) if ctx.distributed else raw

    def step_for(m, prec):  # an eager step at a candidate precision, for la.autotune to time
        return engine.make_train_step(m, criterion, opt, Runtime(ctx.device, prec), tc.batch_size)

    probe = autotune.Probe(net, raw, opt, lambda: next(loader.batches(0)), step_for)
    steps_left = (tc.epochs - start[0]) * steps_per_epoch - start[1]
    task = f"{len(counts)} classes, loss {config.method_name(cfg.loss)}"
    px = cfg.data.image_size if cfg.data.dataset in ("folder", "list") else 32  # CIFAR is 32 px whatever it says
    rt, compiled_net = autotune.choose(tc, cfg.model, ctx, probe, lambda: compiled(net, tc), steps_left, saved, task=task,
                                       image_size=px)
    net = net if compiled_net is None else compiled_net
    return Training(net, raw, criterion, opt, sched, rt, engine.make_train_step(net, criterion, opt, rt, tc.batch_size))


def describe(cfg, splits, t, ctx):
    """The start-up line: data, model, loss, processes and runtime."""
    bn = f", batch norm over {cfg.model.bn_batch} images" if cfg.model.bn_batch else ""
    tau = f" tau={cfg.loss.tau:g}" if cfg.loss.name == "la" else ""
    drw = f" (re-weighted from epoch {cfg.loss.drw_epoch + 1})" if cfg.loss.drw else ""
    files = cfg.data.dataset in data.FILE_DATASETS
    source = f"{cfg.data.dataset} {cfg.data.root}" if files else f"{cfg.data.dataset}-LT rho={cfg.data.rho:g} ({cfg.data.profile})"
    return (f"{source}, {len(splits.train_y)} train / "
            f"{len(splits.val_y)} val / {len(splits.test_y)} test images; {cfg.model.name} "
            f"({models.num_params(t.raw_model) / 1e6:.2f}M params{bn}), loss={config.method_name(cfg.loss)}{tau}{drw}; "
            f"{ctx.world_size} x {ctx.device.type}, {t.runtime.describe()}, {'image-file' if files else cfg.data.loader} loader, "
            f"global batch {cfg.train.batch_size}")
