"""Checkpoints are plain torch.save dicts, written atomically so a kill at any moment leaves one loadable.

They hold only tensors and plain Python data (dicts, lists, tuples, strings, numbers), and are read back with
torch.load(weights_only=True): loading a file someone sent never runs code from it.
"""
import hashlib
import os
import pickle
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from la import UserError


def save_atomic(obj, path):
    """torch.save to a temporary file beside path, fsync, rename over path, fsync the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide checkpoints from collaborators
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):  # a full disk (ENOSPC), a quota: the old file was never touched
            kept = f"the previous {path.name} is kept whole" if path.exists() else "there was no previous one"
            raise UserError(f"could not write {path} ({e.strerror or e}); {kept}")
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# Checkpoints written before the RNG states were plain data hold numpy's MT19937 key, a uint32 ndarray: these
# rebuild one (its reconstructor, class, dtype and dtype class) and nothing else.
OLD_NUMPY_KEY = [np.empty(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_plain(path, what, map_location="cpu", allow=()):
    """torch.load(weights_only=True), which rebuilds only tensors and plain data (plus the types in allow).

    A file that asks for anything else (a function to call, a class to build) is refused, naming it, before
    anything in it runs: a UserError. Other failures (a truncated file) are the caller's to report.
    """
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        name = re.search(r"GLOBAL ([\w.]+)", str(e))
        if name is None:
            raise
        raise UserError(f"{what} {path} was not loaded: it asks to import {name[1]}, which no file written by "
                        f"this repository holds, and unpickling it could run code")


def load(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = load_plain(path, "checkpoint", map_location, allow=OLD_NUMPY_KEY)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__})")
    missing = {"model", "config", "class_counts", "epoch"} - set(ckpt) if isinstance(ckpt, dict) else {"everything"}
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(sorted(missing))}; is it from this repository?")
    return ckpt


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


def progress(ckpt):
    """How far a checkpoint's run got: {"finished", "epoch", "step", "epochs"} (epoch: epochs completed; step:
    steps into the next one, after a stop by signal)."""
    epochs = ckpt["config"]["train"]["epochs"]
    epoch, step = ckpt["epoch"], ckpt.get("step", 0)
    return {"finished": epoch >= epochs and not step, "epoch": epoch, "step": step, "epochs": epochs}


def describe_progress(state):
    """'epoch 64 of 200', or 'epoch 64, step 37 into epoch 65, of 200'."""
    at = f"epoch {state['epoch']}" + (f", step {state['step']} into epoch {state['epoch'] + 1}," if state["step"] else "")
    return f"{at} of {state['epochs']}"


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
