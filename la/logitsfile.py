"""Logits from any model, in one file eval.py reads (--logits) and writes (--export-logits).

A .npz (numpy.savez) or .pt (torch.save of a dict) holding test_logits (N x C floats), test_labels (N integers in
0..C-1), train_counts (C training images per class) and, optionally, val_logits and val_labels: a held-out
validation split, on which tau is chosen.
"""
from pathlib import Path

import numpy as np
import torch

from la import UserError, checkpoint

REQUIRED = ("test_logits", "test_labels", "train_counts")
VALIDATION = ("val_logits", "val_labels")
SUFFIXES = (".npz", ".pt")


def read(path):
    """The file's arrays as {key: numpy array}; a UserError for a file that is absent, unreadable or not a dict."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise UserError(f"--logits {path}: expected a .npz or .pt file")
    if not path.is_file():
        raise UserError(f"--logits {path}: no such file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:  # a pickled object array is refused, never run
                return {k: f[k] for k in f.files}
        raw = checkpoint.load_plain(path, "logits file")
    except UserError:
        raise
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--logits {path} could not be read ({detail})")
    if not isinstance(raw, dict):
        raise UserError(f"--logits {path} holds a {type(raw).__name__}, not a dict of arrays")
    as_array = lambda v: (v.float() if v.is_floating_point() else v).numpy() if torch.is_tensor(v) else np.asarray(v)
    return {k: as_array(v) for k, v in raw.items()}  # float(): numpy has no bfloat16


def check_split(arrays, split, num_classes):
    """(logits as float32, labels as int64) tensors of one split, or a UserError naming what is wrong."""
    logits, labels = arrays[f"{split}_logits"], arrays[f"{split}_labels"]
    if logits.ndim != 2 or not np.issubdtype(logits.dtype, np.floating):
        raise UserError(f"{split}_logits must be an N x C array of floats, got shape {logits.shape} of {logits.dtype}")
    if logits.shape[1] != num_classes:
        raise UserError(f"{split}_logits has {logits.shape[1]} classes (columns) but train_counts has {num_classes}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{split}_labels must be a 1-D array of integers, got shape {labels.shape} of {labels.dtype}")
    if len(labels) != len(logits):
        raise UserError(f"{split}_logits has {len(logits)} rows but {split}_labels has {len(labels)} labels")
    if not len(labels):
        raise UserError(f"{split}_logits and {split}_labels are empty")
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        raise UserError(f"{split}_logits holds NaN or infinite values in {int(bad.sum())} rows (first: row "
                        f"{int(bad.argmax())})")
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        raise UserError(f"{split}_labels holds {int(labels[outside][0])} (at {int(outside.argmax())}), outside "
                        f"0..{num_classes - 1} for the {num_classes} classes of train_counts")
    return torch.from_numpy(np.ascontiguousarray(logits)).float(), torch.from_numpy(labels.astype(np.int64))


def check_counts(counts):
    """train_counts as a list of ints, or a UserError: not whole numbers, negative, or zero (naming the classes)."""
    if counts.ndim != 1 or len(counts) < 2 or not (np.issubdtype(counts.dtype, np.integer)
                                                    or np.issubdtype(counts.dtype, np.floating)):
        raise UserError(f"train_counts must be a 1-D array of C >= 2 numbers, got shape {counts.shape} of {counts.dtype}")
    if not (np.isfinite(counts).all() and (counts == np.round(counts)).all() and (counts >= 0).all()):
        raise UserError("train_counts must hold whole numbers >= 0 (training images per class)")
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise UserError(f"train_counts is 0 for class{'es' if len(empty) > 1 else ''} {', '.join(map(str, empty))}: "
                        f"a class without training images has log-prior -inf, so post-hoc adjustment is undefined")
    return [int(n) for n in counts]


def load(path):
    """(splits, counts): {"test": (logits, labels)} and "val" when the file has it, and the training counts."""
    arrays = read(path)
    missing = [k for k in REQUIRED if k not in arrays]
    half = [k for k in VALIDATION if k not in arrays]
    if missing or len(half) == 1:
        raise UserError(f"--logits {path} lacks {', '.join(missing + (half if len(half) == 1 else []))} "
                        f"(it needs {', '.join(REQUIRED)}, and optionally both of {', '.join(VALIDATION)})")
    try:
        counts = check_counts(arrays["train_counts"])
        val, test = arrays.get("val_logits"), arrays["test_logits"]
        if val is not None and val.ndim == test.ndim == 2 and val.shape[1] != test.shape[1]:
            raise UserError(f"val_logits has {val.shape[1]} classes (columns) but test_logits has {test.shape[1]}")
        splits = {s: check_split(arrays, s, len(counts)) for s in ("test", "val") if f"{s}_logits" in arrays}
    except UserError as e:
        raise UserError(f"--logits {path}: {e}")
    return splits, counts


def check_target(path, flag):
    """A UserError unless path can be written as a logits file: a .npz or .pt name in a folder that exists."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise UserError(f"{flag} {path}: name a .npz or .pt file")
    if not path.absolute().parent.is_dir():
        raise UserError(f"{flag} {path}: the folder {path.absolute().parent} does not exist")


def export(splits, counts, path):
    """Write splits ({"val", "test": (logits, labels)}) and training counts in the format load reads."""
    path = Path(path)
    check_target(path, "--export-logits")
    out = {"train_counts": np.asarray(counts, dtype=np.int64)}
    for split, (logits, labels) in splits.items():
        out[f"{split}_logits"], out[f"{split}_labels"] = logits.float().numpy(), labels.long().numpy()
    try:
        if path.suffix == ".npz":
            np.savez(path, **out)
        else:
            torch.save({k: torch.from_numpy(v) for k, v in out.items()}, path)
    except OSError as e:
        raise UserError(f"could not write --export-logits {path} ({e.strerror or e})")
