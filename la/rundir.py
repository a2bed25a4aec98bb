"""The run directory, and the module that owns its layout. train.py, eval.py and the scripts read and write it
through these functions (but for eval.py's caches, which eval.py keeps itself):

    config.yaml      the resolved recipe              split.json       the data split's manifest
    runtime.json     precision, compile, CUDA graph   provenance.json  one entry per session (la.provenance)
    metrics.jsonl    one JSON line per epoch          checkpoint.pt    weights, optimizer, schedule, position, RNGs
    eval.json        eval.py's report                 logits.pt        eval.py's logits cache
    features.pt      eval.py's penultimate-features cache (weight normalisation)

and runs/latest, under the working directory, pointing at the newest run.

    python -m la.rundir finished RUN     # exit 0 when RUN's metrics reached its recipe's epochs (for scripts)
"""
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from la import UserError, checkpoint, config, data, models, provenance

FILES = ("checkpoint.pt", "metrics.jsonl", "config.yaml", "split.json", "runtime.json", "provenance.json", "eval.json",
         "logits.pt", "features.pt")
# Keys that may differ when resuming: where the data lives and how long / how often, not what is learned.
RESUMABLE_CHANGES = {"data.root", "data.download", "data.workers", "train.epochs", "train.eval_every",
                     "train.save_every", "train.eval_batch_size", "train.compile",
                     "train.compile_mode", "train.cuda_graph", "train.out"}
DRW_KEYS = {"loss.drw", "loss.drw_epoch", "loss.drw_beta"}


# ---------------------------------------------------------------- one trainer per run

OWNER = ".owner.json"  # who holds the lock: pid, host, start time (information only; the lock is the flock)
_held = {}  # run directory -> (descriptor of the lock this process holds, the folders its mkdir created, deepest first)


def own(run_dir):
    """Make this process the run's only trainer: an exclusive flock on the run directory itself (created if new,
    and nothing else is), taken atomically and held until release() or until the process ends, however it ends:
    the kernel drops it with the last descriptor, on SIGKILL too. Another holder is a UserError naming it."""
    created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # deepest first; [] for an existing one
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise UserError(f"cannot use {run_dir} as a run directory: {e.strerror}")
    for attempt in range(3):  # a few tries: eval.py's probe (holder) holds the lock for an instant
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            time.sleep(0.05)
        except OSError as e:  # a file system without flock on directories (some NFS and Lustre mounts): train
            os.close(fd)      # unguarded, and say so, rather than refuse every run there
            print(f"warning: cannot lock {run_dir} on this file system ({e.strerror}); nothing stops a second "
                  f"trainer on it", file=sys.stderr)
            return
    else:
        os.close(fd)
        raise UserError(f"{run_dir} is being trained by {holder(run_dir) or 'another process'}; one run directory has one trainer at a "
                        f"time: wait for it to end, stop it, or pass another --out")
    _held[run_dir] = fd, created
    tmp = run_dir / f".owner.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")
    os.replace(tmp, run_dir / OWNER)


def _forget_in_child():
    """A forked child (a DataLoader worker) shares the lock's open file, and an flock lasts while any descriptor
    of it is open: killed with SIGKILL, the trainer would leave the run locked until its workers noticed and
    exited, seconds later, and an immediate --resume or torchrun restart would be refused naming a dead pid. So a
    child closes its copies at once (close, not LOCK_UN, which would drop the parent's lock too) and owns nothing."""
    for fd, _ in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def release():
    """Give up the runs this process owns (its owner record goes; a killed process's stale one is harmless). A run
    directory this process created and left empty (a start that failed before writing anything) goes too, with
    the parent folders created for it."""
    for run_dir, (fd, created) in list(_held.items()):
        (run_dir / OWNER).unlink(missing_ok=True)
        for d in created:
            try:
                d.rmdir()  # only if empty: never anything a run wrote, nor a folder something else filled since
            except OSError:
                break
        os.close(fd)
        del _held[run_dir]


def holder(run_dir):
    """'pid P on host H since T' for the process training run_dir now, or None when no process holds it."""
    if Path(run_dir) in _held:
        return None
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        try:
            o = json.loads((Path(run_dir) / OWNER).read_text())
            return f"pid {o['pid']} on host {o['host']} since {o['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process (starting up)"
    except OSError:  # no locks on this file system: nothing to tell
        return None
    finally:
        os.close(fd)


# ---------------------------------------------------------------- starting and resuming

def claim(run_dir, resume, overwrite, is_main):
    """Own the run (rank 0) and decide how it starts: (resume?, files to replace, a note for the start-up line).
    A worker that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0) continues its run from the last checkpoint,
    or starts it afresh when the first attempt died before saving one: the run directory is its own job's.
    Every rank calls it, first thing after the rendezvous (torchrun_job() gathers from all ranks)."""
    job = torchrun_job()
    if resume and not run_dir.is_dir():
        check_start(run_dir, resume, overwrite)  # refuses: there is nothing to own, and nothing is created
    if is_main:
        own(run_dir)
    restart, note = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0), None
    if restart and not resume:
        # the run is this job's only if its provenance says so; else the first attempt stopped before starting
        # it, perhaps refusing a run already there, and the restart checks the same way again
        ours = same_job(started_by(run_dir), job)
        resume, overwrite = ours and (run_dir / "checkpoint.pt").is_file(), overwrite or ours
        note = (f"torchrun restart {restart}: " + ("continuing from the last checkpoint" if resume else
                                                   "no checkpoint saved yet, so the run starts afresh"))
    return resume, check_start(run_dir, resume, overwrite), note


_agents = None  # the torchrun agents of this process's job, gathered once: a process never changes job


def torchrun_job():
    """The torchrun job this worker belongs to, as provenance.json records it (None outside torchrun): the
    rendezvous run id (--rdzv-id, which torchrun requires to be unique per job), or, under its default 'none'
    (the same for every job), the sorted list of the job's torchrun agents, one per node (agent()).

    Why the agents: an agent serves one job all its life and outlives its workers' restarts, so a restarted
    worker finds its own node's agent in the list its job recorded, and a new job (new agents) never does.
    All the nodes' agents, not only rank 0's, because a restart's rendezvous may put rank 0 on another node.
    Not MASTER_ADDR:MASTER_PORT (the rendezvous endpoint, reused by the next job given the same one), nor a
    nonce drawn by the first attempt (a restart could not prove it was drawn by its own job).
    The first call gathers from every rank (a collective where the process group is up): claim() makes it."""
    global _agents
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id != "none":
        return run_id
    if _agents is None:
        mine = agent()
        everyone = [mine] * (dist.get_world_size() if dist.is_initialized() else 1)
        if dist.is_initialized():
            dist.all_gather_object(everyone, mine)
        _agents = sorted(set(everyone))
    return _agents


def agent():
    """This worker's torchrun agent (its parent process), unique on the machine until it reboots: host, pid and
    the process's start time (clock ticks since boot, /proc/PID/stat's 22nd field), so a reused pid is another."""
    pid = os.getppid()
    try:
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "?"
    return f"{socket.gethostname()}:{pid}:{started}"


def same_job(recorded, job):
    """Whether a run recorded as started by job `recorded` (started_by) was started by `job` (torchrun_job)."""
    if isinstance(job, list):  # the default run id: an agent in common
        return isinstance(recorded, list) and bool({str(a) for a in recorded} & set(job))
    return job is not None and recorded == job


def started_by(run_dir):
    """The torchrun job that last started or resumed run_dir (its provenance.json), or None."""
    try:
        return json.loads((run_dir / "provenance.json").read_text())["sessions"][-1].get("torchrun_job")
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def check_start(run_dir, resume, overwrite):
    """Refuse to start over an existing run by accident; return the files --overwrite will replace."""
    if resume:
        if not (run_dir / "checkpoint.pt").is_file():
            raise UserError(f"--resume: no checkpoint at {run_dir / 'checkpoint.pt'}")
        return []
    taken = [f for f in FILES if (run_dir / f).exists()]
    if taken and not overwrite:
        raise UserError(f"{run_dir} already holds a run ({', '.join(taken)}); pass --resume to continue it or --overwrite to replace it")
    return taken


def check_resumable(cfg, saved, epochs_begun):
    """The resumed run must learn the same thing it started learning. Deferred re-weighting may be switched on or
    off, or moved, while the checkpoint (with `epochs_begun` epochs begun) predates it under both settings: nothing
    trained so far depended on it. That is how LDAM and LDAM-DRW share their first 160 epochs. train.epochs may
    change (run longer or shorter) but under a cosine schedule, whose decay it sets, once training has begun."""
    now, then = dict(config.flatten(config.to_dict(cfg))), dict(config.flatten(config.to_dict(config.from_dict(saved))))
    drw_start = lambda c: c["loss.drw_epoch"] if c["loss.drw"] else float("inf")
    free = RESUMABLE_CHANGES | (DRW_KEYS if epochs_begun <= min(drw_start(now), drw_start(then)) else set())
    if now["optim.schedule"] == "cosine" and epochs_begun:
        free = free - {"train.epochs"}  # the cosine spans train.epochs: another length is another learning rate
    changed = sorted(k for k in now if now[k] != then[k] and k not in free)
    if changed:
        k = changed[0]
        raise UserError(f"checkpoint was trained with {k}={then.get(k)!r} but {now[k]!r} was asked for; "
                        f"resume with the run's own settings")


def recorded_world_size(run_dir, ckpt):
    """The world size a checkpoint was trained at: its own record, else (checkpoints from before it was kept) the
    last session's in provenance.json, else None (unknown)."""
    if "world_size" in ckpt:
        return ckpt["world_size"]
    try:
        return int(json.loads((Path(run_dir) / "provenance.json").read_text())["sessions"][-1]["world_size"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def check_world_size(cfg, n_train, then, now):
    """None when a run trained at world size `then` may resume at `now`, else refused (UserError); a note (str) when
    it may but something must be said. Batch norm normalises each process's batch, so another world size is
    another run, unless model.bn_batch cuts every batch of the epoch into the same groups of images either way
    (each process's share into models.group_sizes) and the epoch keeps its batches (with data.drop_last, the
    short last batch is dropped at every world size alike)."""
    if then is None:
        return (f"note: the checkpoint does not record its world size (written before it was kept, and no "
                f"provenance.json says); resuming at {now}, which must be the one it trained at to continue the same run")
    if then == now:
        return None
    tc, g = cfg.train, cfg.model.bn_batch
    sizes = {w: [len(b) for b in data.epoch_plan(n_train, tc.batch_size, w, tc.seed, 0, cfg.data.drop_last)]
             for w in (then, now)}
    groups = lambda w: [models.group_sizes(b // w, g) * w for b in sizes[w]]
    if sizes[then] != sizes[now]:
        why = f"an epoch's batches change ({len(sizes[then])} steps, last of {sizes[then][-1]} images; now " \
              f"{len(sizes[now])}, last of {sizes[now][-1]})"
    elif g <= 0 or groups(then) != groups(now):
        why = "batch norm normalises each process's batch" if g <= 0 else \
            f"batch norm over groups of {g} would cut some batch into other groups"
    else:
        return (f"note: world size {then} -> {now}: batch norm over groups of {g} sees the same groups of images "
                f"and the epoch the same {len(sizes[now])} batches, so the run continues as it was")
    raise UserError(f"checkpoint was trained by {then} process(es) but {now} resume it, and {why}; resume with "
                    f"--nproc_per_node (and --nnodes) giving world size {then}")


def load_resumable(run_dir, cfg, splits, world_size=1):
    """The checkpoint --resume continues, checked: the same recipe (but for RESUMABLE_CHANGES), the same data
    split, the same world size (check_world_size), and not past the epochs asked for. Returns (checkpoint, a note
    to print or None)."""
    ckpt = checkpoint.load(run_dir / "checkpoint.pt")
    check_resumable(cfg, ckpt["config"], ckpt["epoch"] + (ckpt["step"] > 0))
    note = check_world_size(cfg, len(splits.train_y), recorded_world_size(run_dir, ckpt), world_size)
    if not data.same_split(ckpt.get("split_manifest"), splits.manifest):
        raise UserError(f"the data split differs from the one {run_dir} was trained on; check --data-root")
    epochs = cfg.train.epochs
    if ckpt["epoch"] > epochs or (ckpt["epoch"] == epochs and ckpt["step"]):
        raise UserError(f"{run_dir} has trained {ckpt['epoch']} epochs, more than the {epochs} asked for")
    return ckpt, note


def start(run_dir, cfg, splits, rt, replaced, resumed_at=None):
    """Write a starting (or resumed, at (epoch, step)) run's files: rank 0, once everything is set up, so that a
    start that fails leaves the old run whole."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in replaced:
        (run_dir / f).unlink()
    for tmp in run_dir.glob(".checkpoint.pt.*.tmp"):  # left by a save that was killed
        tmp.unlink()
    if resumed_at is not None:  # drop metric lines written after the checkpoint (a kill between the two writes)
        write_metrics(run_dir, [m for m in read_metrics(run_dir) if m["epoch"] <= resumed_at[0]])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(cfg), sort_keys=False))
    (run_dir / "split.json").write_text(json.dumps(splits.manifest, indent=1) + "\n")
    update_latest(run_dir)
    (run_dir / "runtime.json").write_text(json.dumps(rt.to_dict(), indent=1) + "\n")
    provenance.record(run_dir, rt.device, rt.precision, resumed_at, torchrun_job=torchrun_job())


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


# ---------------------------------------------------------------- during training

def save_checkpoint(run_dir, t, cfg, splits, epoch, step, partial, record=None):
    """The checkpoint of a la.build.Training at (epoch, step): a plain dict of tensors and plain data (see
    la.checkpoint), with the epoch's running sums so far (partial) when it stops mid-epoch, and at an epoch's end
    that epoch's training figures (record), its metrics line before evaluation (see lost_record)."""
    checkpoint.save_atomic({
        "model": t.raw_model.state_dict(), "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
        "epoch": epoch, "step": step, "partial": partial, "rng": checkpoint.rng_state(), "runtime": t.runtime.to_dict(),
        "config": config.to_dict(cfg), "class_counts": splits.counts, "split_manifest": splits.manifest,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1, "record": record,
    }, run_dir / "checkpoint.pt")


def lost_record(run_dir, ckpt, ctx):
    """The training figures the checkpoint holds of the epoch it ends, when metrics.jsonl has no line for that
    epoch (the checkpoint is saved before the evaluation, and a crash or kill during it loses the line); else None.
    Rank 0 reads the file and every rank gets its answer, since evaluating is collective."""
    record = ckpt.get("record") if ckpt and not ckpt["step"] else None  # checkpoints before records: nothing to do
    lost = ctx.is_main and record is not None and all(m["epoch"] != ckpt["epoch"] for m in read_metrics(run_dir))
    flag = torch.tensor([float(lost)], device=ctx.device)
    if dist.is_initialized():
        dist.all_reduce(flag)
    return record if flag.item() else None


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def write_metrics(run_dir, records):
    (Path(run_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def append_metrics(run_dir, record):
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def finished(run_dir):
    """Whether metrics.jsonl reached config.yaml's train.epochs; None when either is missing or unreadable."""
    try:
        epochs = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["train"]["epochs"]
        last = read_metrics(run_dir)[-1]["epoch"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return last >= epochs


# ---------------------------------------------------------------- evaluation

def resolve(path):
    """A run directory (or the runs/latest link) or a checkpoint file -> (run_dir, checkpoint path). A run kept
    without its checkpoint but with its logits cache (as results/ keeps most) gives (run_dir, None)."""
    path = Path(path)
    if path.is_dir():
        if (path / "checkpoint.pt").is_file():
            return path.resolve(), path.resolve() / "checkpoint.pt"
        if (path / "logits.pt").is_file():
            return path.resolve(), None
        raise UserError(f"{path} holds no checkpoint.pt (has its first epoch finished?)")
    if path.is_file():
        return path.resolve().parent, path.resolve()
    hint = "; train one first (python train.py)" if path.name == "latest" else ""
    raise UserError(f"no run at {path}{hint}")


# eval.json's bookkeeping: where and with what it was evaluated, not what it reports.
BOOKKEEPING = ("run", "checkpoint", "evaluated_with", "logits_computed_with")


def same_numbers(a, b):
    """Whether two reports say the same, bookkeeping aside and floats equal to 1e-6 (a re-run's last bits)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - set(BOOKKEEPING)
        return all(k in a and k in b and same_numbers(a[k], b[k]) for k in keys)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_numbers(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-6 * max(1, abs(a))
    return a == b


def save_report(run_dir, report):
    """Write eval.json, adding to an earlier report of the same checkpoint (a plain evaluation keeps an earlier
    tau sweep). An eval.json that already reports these numbers is left as it is, so evaluating a committed run
    changes no file; returns whether it was written."""
    path, merged, old = Path(run_dir) / "eval.json", report, None
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        if old.get("checkpoint_sha256") == report["checkpoint_sha256"]:
            merged = {**old, **report}
            for split in ("val", "test"):
                if split in old and split in report:
                    merged[split] = {**old[split], **report[split]}
    if old is not None and same_numbers(merged, old):
        print(f"{path}: already reports these numbers, left unchanged")
        return False
    path.write_text(json.dumps(merged, indent=1) + "\n")
    return True


if __name__ == "__main__":
    if sys.argv[1:2] != ["finished"] or len(sys.argv) != 3:
        sys.exit("usage: python -m la.rundir finished RUN")
    sys.exit(0 if finished(sys.argv[2]) else 1)
