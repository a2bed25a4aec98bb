"""Provenance: the commit, dirty flag, command, torch, device and precision of every run, null outside git."""
import json
import shutil
import subprocess

import pytest
import torch

from conftest import REPO, TINY, run
from la import provenance

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_git_state_commit_dirty_and_outside_a_checkout(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    assert provenance.git_state(repo) == {"git_commit": None, "git_dirty": None}  # no commit yet
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    git(repo, "commit", "-q", "-m", "one")
    head = git(repo, "rev-parse", "HEAD")
    assert provenance.git_state(repo) == {"git_commit": head, "git_dirty": False}
    (repo / "untracked.txt").write_text("runs and notes are not code changes\n")
    assert provenance.git_state(repo)["git_dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    assert provenance.git_state(repo) == {"git_commit": head, "git_dirty": True}
    assert provenance.short_commit(provenance.git_state(repo)) == head[:7] + "+dirty"
    # code copied into some other repository is not at that repository's commit
    (repo / "copy").mkdir()
    assert provenance.git_state(repo / "copy") == {"git_commit": None, "git_dirty": None}
    assert provenance.git_state(tmp_path / "elsewhere") == {"git_commit": None, "git_dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path / "no-binaries-here"))  # no git at all
    assert provenance.git_state(repo) == {"git_commit": None, "git_dirty": None}
    assert provenance.short_commit(provenance.git_state(repo)) == "no commit"


def test_device_name_is_the_cpu_model():
    with open("/proc/cpuinfo") as f:
        models = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    if not models:
        pytest.skip("no model name in /proc/cpuinfo")
    assert provenance.device_name("cpu") == models[0]


def test_sessions_start_afresh_and_resumes_append(tmp_path):
    provenance.record(tmp_path, "cpu", "bf16")
    provenance.record(tmp_path, "cpu", "bf16", resumed_at=(14, 59))
    sessions = json.loads((tmp_path / "provenance.json").read_text())["sessions"]
    assert [(s["resumed"], s["start"]) for s in sessions] == [(False, {"epoch": 0, "step": 0}),
                                                              (True, {"epoch": 14, "step": 59})]
    assert sessions[0]["precision"] == "bf16" and sessions[0]["torch"] == torch.__version__
    provenance.record(tmp_path, "cpu", "fp32")  # a new run (--overwrite) forgets the old one's sessions
    assert len(json.loads((tmp_path / "provenance.json").read_text())["sessions"]) == 1


def test_training_records_provenance_and_eval_its_commit(fake_root, tmp_path):
    out = tmp_path / "run"
    run([REPO / "train.py", "--data-root", fake_root, "--epochs", "1", "--out", out] + TINY, tmp_path)
    (session,) = json.loads((out / "provenance.json").read_text())["sessions"]
    assert session["git_commit"] == provenance.git_state()["git_commit"]
    assert session["git_dirty"] == provenance.git_state()["git_dirty"]
    assert session["argv"][0].endswith("train.py") and "--epochs" in session["argv"]
    assert (session["torch"], session["precision"], session["world_size"]) == (torch.__version__, "fp32", 1)
    assert session["device"] == provenance.device_name("cpu")
    run([REPO / "eval.py", out, "--data-root", fake_root], tmp_path)
    report = json.loads((out / "eval.json").read_text())
    assert report["evaluated_with"]["git_commit"] == provenance.git_state()["git_commit"]
    assert report["logits_computed_with"]["precision"] == "fp32"


def test_outside_a_git_checkout_the_commit_is_null(fake_root, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    for part in ("train.py", "eval.py", "la", "configs"):
        copy = shutil.copytree if (REPO / part).is_dir() else shutil.copy
        copy(REPO / part, code / part)
    out = tmp_path / "run"
    run([code / "train.py", "--data-root", fake_root, "--epochs", "1", "--out", out] + TINY, tmp_path,
        env={"PYTHONPATH": str(code)})
    (session,) = json.loads((out / "provenance.json").read_text())["sessions"]
    assert session["git_commit"] is None and session["git_dirty"] is None and session["torch"] == torch.__version__
    run([code / "eval.py", out, "--data-root", fake_root], tmp_path, env={"PYTHONPATH": str(code)})
    assert json.loads((out / "eval.json").read_text())["evaluated_with"]["git_commit"] is None
