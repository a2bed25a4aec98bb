"""Checkpoints are plain torch.save dicts, written atomically so a kill at any moment leaves one loadable."""
import hashlib
import os
import tempfile
from pathlib import Path

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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise UserError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__})")
    missing = {"model", "config", "class_counts", "epoch"} - set(ckpt) if isinstance(ckpt, dict) else {"everything"}
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(sorted(missing))}; is it from this repository?")
    return ckpt


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
