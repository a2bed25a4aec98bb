"""Where a run came from: the code's commit, the command, torch, the device and the precision.

train.py appends one session (start or resume) to RUN/provenance.json; eval.py records the evaluating
code in eval.json. Outside a git checkout, or without git, the commit fields are null.
"""
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from la.hardware import cpu_name

REPO = Path(__file__).resolve().parent.parent


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)


def git_state(repo=REPO):
    """{"git_commit": HEAD's hash, "git_dirty": uncommitted changes to tracked files}; both None when repo is
    not the top of a git checkout (a copy of the code inside some other repository is not its commit)."""
    unknown = {"git_commit": None, "git_dirty": None}
    try:
        top = _git(repo, "rev-parse", "--show-toplevel")
        if top.returncode or Path(top.stdout.strip()).resolve() != Path(repo).resolve():
            return unknown
        head, status = _git(repo, "rev-parse", "HEAD"), _git(repo, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return unknown
    if head.returncode or status.returncode:  # e.g. a repository without a commit yet
        return unknown
    return {"git_commit": head.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def short_commit(state):
    """'abc1234', 'abc1234+dirty', or 'no commit'."""
    if not state.get("git_commit"):
        return "no commit"
    return state["git_commit"][:7] + ("+dirty" if state.get("git_dirty") else "")


def device_name(device):
    """The GPU's name, or the CPU model from /proc/cpuinfo (platform's guess elsewhere)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def collect(device, precision=None):
    """One session's provenance, as JSON-ready values."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **git_state(),
        "argv": list(sys.argv),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a str subclass torch.load(weights_only=True) refuses
        "cuda": torch.version.cuda,
        "device": device_name(device),
        "precision": precision,
    }


def record(run_dir, device, precision, resumed_at=None, **more):
    """Start RUN/provenance.json afresh, or, for a run resumed at resumed_at = (epoch, step), append this session
    (a session resumed at the last epoch trained nothing), with `more` fields (la.rundir: the torchrun job)."""
    path = Path(run_dir) / "provenance.json"
    sessions = []
    if resumed_at is not None and path.is_file():
        try:
            sessions = json.loads(path.read_text())["sessions"]
        except (ValueError, KeyError, TypeError):
            sessions = []  # unreadable: keep what this session knows
    start = {"epoch": 0, "step": 0} if resumed_at is None else {"epoch": resumed_at[0], "step": resumed_at[1]}
    sessions.append({"resumed": resumed_at is not None, "start": start, **collect(device, precision), **more})
    tmp = path.with_name(f".provenance.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"sessions": sessions}, indent=1) + "\n")
    os.replace(tmp, path)
