"""Train a ResNet on long-tailed CIFAR with cross-entropy (--loss ce) or the logit-adjusted loss (--loss la).

    python train.py --loss la --rho 100
    torchrun --nproc_per_node=2 train.py --loss la --rho 100
    python train.py --out runs/my_run --resume        # continue an interrupted run

Reads top to bottom: config -> distributed set-up -> data, model, optimizer -> epochs -> checkpoint.
"""
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from la import UserError, run_cli, autotune, checkpoint, config, data, dist, engine, losses, models, precision, provenance

# Keys that may differ when resuming: where the data lives and how long / how often, not what is learned.
RESUMABLE_CHANGES = {"data.root", "data.download", "data.workers", "train.epochs", "train.eval_every",
                     "train.save_every", "train.eval_batch_size", "train.compile",
                     "train.compile_mode", "train.cuda_graph", "train.out"}
DRW_KEYS = {"loss.drw", "loss.drw_epoch", "loss.drw_beta"}
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "config.yaml", "split.json", "runtime.json", "provenance.json", "eval.json",
             "logits.pt", "features.pt")


def parse_args(argv):
    parser = config.Parser(description=__doc__.split("\n")[0])
    config.add_recipe_flags(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished or started run in --out")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    return parser.parse_args(argv)


def lr_factor(step, steps_per_epoch, optim):
    """Linear warm-up over warmup_epochs (per step), then x gamma at each milestone epoch."""
    epoch = step // steps_per_epoch
    if epoch < optim.warmup_epochs:
        return (step + 1) / (optim.warmup_epochs * steps_per_epoch)
    return optim.gamma ** sum(epoch >= m for m in optim.milestones)


def prepare_run_dir(run_dir, resume, overwrite):
    """Refuse to start over an existing run by accident; return the files --overwrite will replace."""
    if resume:
        if not (run_dir / "checkpoint.pt").is_file():
            raise UserError(f"--resume: no checkpoint at {run_dir / 'checkpoint.pt'}")
        return []
    taken = [f for f in RUN_FILES if (run_dir / f).exists()]
    if taken and not overwrite:
        raise UserError(f"{run_dir} already holds a run ({', '.join(taken)}); pass --resume to continue it or --overwrite to replace it")
    return taken


def check_resumable(cfg, saved, epochs_begun):
    """The resumed run must learn the same thing it started learning. Deferred re-weighting may be switched on or
    off, or moved, while the checkpoint (with `epochs_begun` epochs begun) predates it under both settings: nothing
    trained so far depended on it. That is how LDAM and LDAM-DRW share their first 160 epochs."""
    now, then = dict(config.flatten(config.to_dict(cfg))), dict(config.flatten(config.to_dict(config.from_dict(saved))))
    drw_start = lambda c: c["loss.drw_epoch"] if c["loss.drw"] else float("inf")
    free = RESUMABLE_CHANGES | (DRW_KEYS if epochs_begun <= min(drw_start(now), drw_start(then)) else set())
    changed = sorted(k for k in now if now[k] != then[k] and k not in free)
    if changed:
        k = changed[0]
        raise UserError(f"checkpoint was trained with {k}={then.get(k)!r} but {now[k]!r} was asked for; "
                        f"resume with the run's own settings")


def rng_state():
    """Every RNG's state as tensors and plain data, which torch.load(weights_only=True) reads back: numpy's
    uint32 key as a list of ints (np.random.set_state takes either)."""
    kind, key, *rest = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (kind, key.tolist(), *rest), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopFlag:
    """SIGTERM/SIGINT ask the loop to finish its step, checkpoint and exit; a second one kills at once."""

    def __init__(self):
        self.signum = None
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum


def launcher():
    """How this process was started, for the resume hint: the same world size gives the same run."""
    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if world == 1:
        return ["python"]
    nodes = [f"--nnodes={world // local}", "<your rendezvous flags>"] if world > local else []
    return ["torchrun"] + nodes + [f"--nproc_per_node={local}"]


def update_latest(run_dir):
    """Point runs/latest (under the working directory, where eval.py looks) at this run."""
    runs = Path("runs")
    runs.mkdir(exist_ok=True)
    target = os.path.relpath(run_dir.resolve(), runs.resolve())
    tmp = runs / f".latest.{os.getpid()}.tmp"  # per process: runs started side by side must not collide
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target if not target.startswith("..") else run_dir.resolve())
    os.replace(tmp, runs / "latest")


def main(argv):
    args = parse_args(argv)
    cfg = config.from_args(args)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.train.batch_size % world_size:  # before the rendezvous: a job that cannot start should not wait for peers
        raise UserError(f"global batch {cfg.train.batch_size} is not divisible by world size {world_size}")
    ctx = dist.setup(args.device)
    try:
        return train(cfg, args, ctx)
    finally:
        dist.teardown()


def train(cfg, args, ctx):
    say = print if ctx.is_main else (lambda *a, **k: None)
    tc = cfg.train
    run_dir = Path(tc.out) if tc.out else config.default_run_dir(cfg)
    replaced = prepare_run_dir(run_dir, args.resume, args.overwrite)
    dist.barrier()

    # ---- data: every rank builds the same subset; the hashes prove it
    splits = data.prepare(cfg.data)
    dist.check_same(splits.manifest, "split manifest")
    # a cuda_graph=true that cannot work is refused now, before the run directory is touched
    precision.resolve_cuda_graph(tc.cuda_graph, ctx.device, ctx.world_size, precision.resolve_compile(tc.compile, ctx.device))
    loader = data.make_loader(cfg.data, splits, tc.batch_size, ctx.rank, ctx.world_size, tc.seed, ctx.device, tc.channels_last)
    steps_per_epoch = loader.steps(0)
    if steps_per_epoch == 0:
        raise UserError(f"{len(splits.train_y)} training images make no batch of {tc.batch_size}")

    # ---- model, loss, optimizer
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    n_classes = data.num_classes(cfg.data.dataset)
    model = models.from_config(cfg, n_classes).to(ctx.device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = losses.from_config(cfg.loss, splits.counts, ctx.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps_per_epoch, cfg.optim))

    start_epoch, start_step, partial, saved_runtime = 0, 0, torch.zeros(3, dtype=torch.float64), None
    if args.resume:
        ckpt = checkpoint.load(run_dir / "checkpoint.pt")
        check_resumable(cfg, ckpt["config"], ckpt["epoch"] + (ckpt["step"] > 0))
        if ckpt.get("split_manifest") != splits.manifest:
            raise UserError(f"the data split differs from the one {run_dir} was trained on; check --data-root")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start_epoch, start_step = ckpt["epoch"], ckpt["step"]
        saved_runtime = ckpt.get("runtime") or {  # checkpoints from before la.autotune: the static rules
            "precision": precision.resolve(ckpt["config"]["train"]["precision"], ctx.device),
            "compile": precision.resolve_compile(ckpt["config"]["train"]["compile"], ctx.device)}
        if start_epoch > tc.epochs or (start_epoch == tc.epochs and start_step):
            raise UserError(f"{run_dir} has trained {start_epoch} epochs, more than the {tc.epochs} asked for")
        partial = ckpt["partial"] if ctx.is_main else partial
        if ctx.is_main:  # drop metric lines written after the checkpoint (a kill between the two writes)
            lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
            kept = [l for l in lines if json.loads(l)["epoch"] <= start_epoch]
            (run_dir / "metrics.jsonl").write_text("".join(l + "\n" for l in kept))
        say(f"resuming {run_dir} at epoch {start_epoch + 1}, step {start_step}")
    if ctx.is_main:  # only now that everything is set up: a start that fails leaves the old run whole
        run_dir.mkdir(parents=True, exist_ok=True)
        for f in replaced:
            (run_dir / f).unlink()
        for tmp in run_dir.glob(".checkpoint.pt.*.tmp"):  # left by a save that was killed
            tmp.unlink()
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(cfg), sort_keys=False))
        (run_dir / "split.json").write_text(json.dumps(splits.manifest, indent=1) + "\n")
        update_latest(run_dir)

    raw_model = model
    if ctx.distributed:
        model = DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)

    def compile_model():
        if tc.compile == "auto":  # chosen for the user: if compiling fails, train uncompiled rather than stop
            torch._dynamo.config.suppress_errors = True
        # static shapes: one graph at the first step, one more for the short last batch; a dynamic-shape graph
        # (what torch.compile makes after a second batch size) ran 7 % slower here
        return torch.compile(model, mode=tc.compile_mode, dynamic=False)

    probe = autotune.Probe(model, raw_model, criterion, optimizer, lambda: next(loader.batches(0)), ctx.device,
                           engine.make_train_step)
    steps_left = (tc.epochs - start_epoch) * steps_per_epoch - start_step
    runtime, compiled = autotune.choose(tc, cfg.model, ctx, probe, compile_model, steps_left, saved_runtime)
    model = model if compiled is None else compiled
    if ctx.is_main:
        (run_dir / "runtime.json").write_text(json.dumps(runtime.to_dict(), indent=1) + "\n")
        provenance.record(run_dir, ctx.device, runtime.precision, (start_epoch, start_step) if args.resume else None)
    train_step = engine.make_train_step(model, criterion, optimizer, runtime.precision, ctx.device, runtime.cuda_graph,
                                        tc.batch_size)

    say(f"run {run_dir}: {cfg.data.dataset}-LT rho={cfg.data.rho:g} ({cfg.data.profile}), {len(splits.train_y)} train / "
        f"{len(splits.val_y)} val / {len(splits.test_y)} test images; {cfg.model.name} "
        f"({models.num_params(raw_model) / 1e6:.2f}M params{f', batch norm over {cfg.model.bn_batch} images' if cfg.model.bn_batch else ''}), "
        f"loss={config.method_name(cfg.loss)}{f' tau={cfg.loss.tau:g}' if cfg.loss.name == 'la' else ''}"
        f"{f' (re-weighted from epoch {cfg.loss.drw_epoch + 1})' if cfg.loss.drw else ''}; {ctx.world_size} x {ctx.device.type}, "
        f"{runtime.describe()}, {cfg.data.loader} loader, global batch {tc.batch_size}")

    late = [m for m in cfg.optim.milestones if m >= tc.epochs]
    if late:  # a shortened run (--epochs 20) keeps the recipe's milestones unless told otherwise
        say(f"note: optim.milestones {late} are not before train.epochs={tc.epochs}, so those learning-rate "
            f"decays never happen; to shorten the schedule too, pass --set optim.milestones=[...]")
    stop = StopFlag()
    check_every = 1 if ctx.device.type == "cpu" else 32  # steps between checks of the stop and non-finite flags
    save = lambda epoch, step, partial_sums: ctx.is_main and checkpoint.save_atomic({
        "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": epoch, "step": step, "partial": partial_sums, "rng": rng_state(), "runtime": runtime.to_dict(),
        "config": config.to_dict(cfg), "class_counts": splits.counts, "split_manifest": splits.manifest,
    }, run_dir / "checkpoint.pt")

    for epoch in range(start_epoch, tc.epochs):
        model.train()
        criterion.set_epoch(epoch)
        t0 = time.perf_counter()
        sums = partial.to(ctx.device)  # [loss * n, correct, n] over this rank's images
        resumed_images = float(partial[2])  # trained before an interruption: not part of this process's speed
        one = torch.ones((), dtype=torch.float64, device=ctx.device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=ctx.device)
        bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{tc.epochs}",
                   disable=(not ctx.is_main) or None, leave=False)
        for step, (x, y) in enumerate(loader.batches(epoch, start_step), start=start_step):
            loss, logits = train_step(x, y)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used
            scheduler.step()
            with torch.no_grad():
                sums += torch.stack([loss.double() * len(y), (logits.argmax(1) == y).sum().double(), one * len(y)])
                nonfinite |= ~torch.isfinite(loss)
            bar.update()
            if (step + 1) % check_every and step + 1 < steps_per_epoch:
                continue  # reading device values stalls a GPU's queue, so only every check_every steps there
            flags = torch.stack([one * (stop.signum is not None), nonfinite.double()])
            if ctx.distributed:
                dist.all_reduce_sum(flags)
            if flags[1] > 0:
                at = f"step {step + 1}" if check_every == 1 else f"steps {step + 2 - check_every}-{step + 1}"
                raise UserError(f"non-finite loss at epoch {epoch + 1}, {at}; the last good checkpoint "
                                f"({run_dir / 'checkpoint.pt'}) is kept")
            if flags[0] > 0:
                bar.close()
                save(epoch, step + 1, dist.all_reduce_sum(sums).cpu())  # rank 0 carries the whole partial sum
                dist.barrier()
                say(f"stopped by signal at epoch {epoch + 1}, step {step + 1}; checkpoint saved. Resume with:\n"
                    f"  {' '.join(launcher() + ['train.py'] + sys.argv[1:] + (['--resume'] if not args.resume else []))}")
                return 128 + (stop.signum or signal.SIGTERM)
        bar.close()
        start_step, partial = 0, torch.zeros(3, dtype=torch.float64)
        train_seconds = time.perf_counter() - t0

        totals = dist.all_reduce_sum(sums).cpu()
        record = {"epoch": epoch + 1, "lr": lr,
                  "train_loss": float(totals[0] / totals[2]), "train_acc": 100 * float(totals[1] / totals[2])}
        dist.sync_buffers(raw_model)
        if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs:
            t1 = time.perf_counter()
            for name, x_split, y_split in (("val", splits.val_x, splits.val_y), ("test", splits.test_x, splits.test_y)):
                if len(y_split):
                    m = engine.evaluate(raw_model, x_split, y_split, splits.counts, ctx, runtime.precision, tc.channels_last, tc.eval_batch_size)
                    record.update({f"{name}_top1": m["top1"], f"{name}_balanced_acc": m["balanced_acc"]})
            record["eval_seconds"] = time.perf_counter() - t1
        record.update({"seconds": train_seconds, "img_per_s": (float(totals[2]) - resumed_images) / train_seconds})
        if ctx.is_main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            shown = {k: v for k, v in record.items() if k not in ("epoch", "seconds", "eval_seconds")}
            say(f"epoch {epoch + 1:3d}/{tc.epochs} " + " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()), flush=True)
        if (epoch + 1) % tc.save_every == 0 or epoch + 1 == tc.epochs:
            save(epoch + 1, 0, partial)
        dist.barrier()
    say(f"done: {run_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
