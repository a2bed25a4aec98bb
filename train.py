"""Train a ResNet on long-tailed CIFAR with cross-entropy (--loss ce), the logit-adjusted loss (--loss la) or LDAM
(--loss ldam, with --drw its deferred re-weighting).

    python train.py --loss la --rho 100
    torchrun --nproc_per_node=2 train.py --loss la --rho 100
    python train.py --out runs/my_run --resume        # continue an interrupted run

Reads top to bottom: config -> distributed set-up -> data -> model, optimizer, runtime (la.build) -> epochs
(la.engine.train_epoch) -> metrics and checkpoint (la.rundir).
"""
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from la import UserError, run_cli, build, config, data, dist, engine, rundir


def parse_args(argv):
    parser = config.Parser(description=__doc__.split("\n")[0])
    config.add_recipe_flags(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished or started run in --out")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    return args


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
        rundir.release()


def train(cfg, args, ctx):
    say = print if ctx.is_main else (lambda *a, **k: None)
    tc = cfg.train
    run_dir = Path(tc.out) if tc.out else config.default_run_dir(cfg)
    resume, replaced, note = rundir.claim(run_dir, args.resume, args.overwrite, ctx.is_main)  # rank 0 owns the run
    dist.barrier()

    # ---- data: every rank builds the same subset; the hashes prove it
    splits = data.prepare(cfg.data)
    dist.check_same(splits.manifest, "split manifest")
    loader = data.make_loader(cfg, splits, ctx)
    if loader.steps(0) == 0:
        raise UserError(f"{len(splits.train_y)} training images make no batch of {tc.batch_size}")

    # ---- model, loss, optimizer, runtime: la.build, as eval.py, scripts/bench.py and the tests build them
    ckpt, resumed_note = rundir.load_resumable(run_dir, cfg, splits, ctx.world_size) if resume else (None, None)
    start = (ckpt["epoch"], ckpt["step"]) if ckpt else (0, 0)
    if note:
        say(note)
    if ckpt:
        say(f"resuming {run_dir} at epoch {start[0] + 1}, step {start[1]}" + (f"\n{resumed_note}" if resumed_note else ""))
    t = build.training(cfg, ctx, splits.counts, loader, ckpt)
    if ctx.is_main:  # only now that everything is built: a start that fails leaves the old run whole
        rundir.start(run_dir, cfg, splits, t.runtime, replaced, start if ckpt else None)
    say(f"run {run_dir}: {build.describe(cfg, splits, t, ctx)}")
    late = [m for m in cfg.optim.milestones if m >= tc.epochs]
    if late:  # a shortened run (--epochs 20) keeps the recipe's milestones unless told otherwise
        say(f"note: optim.milestones {late} are not before train.epochs={tc.epochs}, so those learning-rate "
            f"decays never happen; to shorten the schedule too, pass --set optim.milestones=[...]")
    partial = ckpt["partial"] if ckpt and ctx.is_main else None  # rank 0 carries the interrupted epoch's sums
    lost = rundir.lost_record(run_dir, ckpt, ctx)  # the training figures of an epoch whose metrics line was lost
    return train_epochs(cfg, ctx, run_dir, splits, loader, t, start, partial, args, lost)


def train_epochs(cfg, ctx, run_dir, splits, loader, t, start, partial, args, lost=None):
    """From start = (epoch, step) to train.epochs: train, evaluate, log a metrics line, checkpoint. Returns the exit
    status: 0, or 128 + the signal that stopped it (after saving where it stopped)."""
    tc, (start_epoch, step) = cfg.train, start
    say = print if ctx.is_main else (lambda *a, **k: None)
    save = lambda *at: ctx.is_main and rundir.save_checkpoint(run_dir, t, cfg, splits, *at)
    stop = engine.StopFlag()
    if lost:
        say(f"epoch {lost['epoch']} has no metrics line (its evaluation did not finish): evaluating it now")
        log_epoch(lost, cfg, ctx, run_dir, splits, t)
    for epoch in range(start_epoch, tc.epochs):
        t.model.train()
        t.criterion.set_epoch(epoch)
        t0, meter = time.perf_counter(), engine.Meter(ctx.device, partial)
        resumed_images = float(meter.sums[2])  # trained before an interruption: not part of this process's speed
        bar = tqdm(total=loader.steps(epoch), initial=step, desc=f"epoch {epoch + 1}/{tc.epochs}",
                   disable=(not ctx.is_main) or None, leave=False)
        try:
            lr, step, stopped = engine.train_epoch(t, loader.batches(epoch, step), meter, stop, step, bar)
        except engine.NonFiniteLoss as e:
            raise UserError(f"non-finite loss at epoch {epoch + 1}, {e}; the last good checkpoint "
                            f"({run_dir / 'checkpoint.pt'}) is kept")
        finally:
            bar.close()
        seconds, totals = time.perf_counter() - t0, meter.totals()
        if stopped and step < loader.steps(epoch):  # on the epoch's last step the epoch is whole: logged and saved so
            save(epoch, step, totals)  # rank 0 carries the whole partial sum
            return stopped_by(stop, epoch, step, args, say)
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": float(totals[0] / totals[2]),
                  "train_acc": 100 * float(totals[1] / totals[2]), "seconds": seconds,
                  "img_per_s": (float(totals[2]) - resumed_images) / seconds}
        dist.sync_buffers(t.raw_model)
        if (epoch + 1) % tc.save_every == 0 or epoch + 1 == tc.epochs or stopped:  # before evaluating: kept if it fails
            save(epoch + 1, 0, torch.zeros(3, dtype=torch.float64), record)  # with the record, in case its line is lost
        log_epoch(record, cfg, ctx, run_dir, splits, t)
        if stopped:
            return stopped_by(stop, epoch + 1, 0, args, say)
        dist.barrier()
        step, partial = 0, None
    say(f"done: {run_dir}")
    return 0


def log_epoch(record, cfg, ctx, run_dir, splits, t):
    """Evaluate when the epoch is due, then append its metrics line and print it (rank 0)."""
    tc, epoch = cfg.train, record["epoch"]
    if epoch % tc.eval_every == 0 or epoch == tc.epochs:
        t1 = time.perf_counter()
        record = {**record, **engine.evaluate_splits(t.raw_model, splits, ctx, t.runtime, tc.eval_batch_size,
                                                     cfg.data.normalize), "eval_seconds": time.perf_counter() - t1}
    if ctx.is_main:
        rundir.append_metrics(run_dir, record)
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                         if k not in ("epoch", "seconds", "eval_seconds"))
        print(f"epoch {epoch:3d}/{tc.epochs} {shown}", flush=True)


def stopped_by(stop, epoch, step, args, say):
    """After the save a stop signal asked for: the resume hint, and the exit status 128 + the signal."""
    dist.barrier()
    resume = dist.launcher() + ["train.py"] + sys.argv[1:] + ([] if args.resume else ["--resume"])
    say(f"stopped by signal at epoch {epoch + 1}, step {step}; checkpoint saved. Resume with:\n  {' '.join(resume)}")
    return 128 + (stop.signum or signal.SIGTERM)


if __name__ == "__main__":
    run_cli(main)
