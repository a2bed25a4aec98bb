"""A run's owner and torchrun's restarts: which run a restarted worker continues (only one its own job started), and
training where the file system has no locks (in-process, no training)."""
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys

import pytest

from la import UserError, config, rundir

from conftest import REPO


@pytest.fixture
def restarted(monkeypatch):
    """The environment of a single-node torchrun worker after one restart."""
    for k, v in {"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "1",
                 "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(rundir, "_agents", None, raising=False)  # torchrun_job() gathers once per process
    yield
    rundir.release()


def _run(d, job, checkpoint=True):
    d.mkdir()
    if checkpoint:
        (d / "checkpoint.pt").write_bytes(b"weights")
    (d / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (d / "provenance.json").write_text(json.dumps({"sessions": [{"torchrun_job": job}]}))
    return {p.name: p.read_bytes() for p in d.iterdir()}


def test_a_restart_refuses_a_run_its_job_did_not_start(tmp_path, restarted):
    # the first attempt refused an existing run (no --resume, no --overwrite); the restart must refuse it again,
    # not resume or replace it
    before = _run(tmp_path / "old", "another job")
    with pytest.raises(UserError, match="already holds a run"):
        rundir.claim(tmp_path / "old", False, False, is_main=True)
    rundir.release()
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before


def test_a_restart_continues_or_restarts_its_own_jobs_run(tmp_path, restarted):
    _run(tmp_path / "ours", rundir.torchrun_job())
    resume, replaced, note = rundir.claim(tmp_path / "ours", False, False, is_main=True)
    assert (resume, replaced) == (True, []) and note == "torchrun restart 1: continuing from the last checkpoint"
    _run(tmp_path / "early", rundir.torchrun_job(), checkpoint=False)  # killed before the first save
    resume, replaced, note = rundir.claim(tmp_path / "early", False, False, is_main=True)
    assert (resume, sorted(replaced)) == (False, ["metrics.jsonl", "provenance.json"]) and "starts afresh" in note


def test_a_multi_node_restart_under_the_default_rdzv_id_adopts_only_its_own_jobs_run(tmp_path, restarted,
                                                                                        monkeypatch):
    # torchrun's default --rdzv-id is 'none' for every job: a new job's restart must not take an old job's run
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    real = os.getppid()
    monkeypatch.setattr(os, "getppid", os.getpid)  # another job: another torchrun agent
    other = rundir.torchrun_job()
    monkeypatch.setattr(rundir, "_agents", None, raising=False)
    monkeypatch.setattr(os, "getppid", lambda: real)
    for name in ("old", "early"):
        before = _run(tmp_path / name, other, checkpoint=name == "old")
        with pytest.raises(UserError, match="already holds a run"):
            rundir.claim(tmp_path / name, False, False, is_main=True)
        rundir.release()
        assert {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()} == before
    # its own job's run is continued, whichever node's agent is found in the job's record (rank 0 may move)
    _run(tmp_path / "ours", ["otherhost:4242:17", *rundir.torchrun_job()])
    assert rundir.claim(tmp_path / "ours", False, False, is_main=True)[:2] == (True, [])


def test_a_file_system_without_locks_trains_unguarded_and_says_so(tmp_path, monkeypatch, capsys):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    rundir.own(tmp_path / "run")  # no traceback: a run on such a mount still starts
    assert capsys.readouterr().err == (f"warning: cannot lock {tmp_path / 'run'} on this file system (No locks "
                                       f"available); nothing stops a second trainer on it\n")
    assert rundir.holder(tmp_path / "run") is None and list((tmp_path / "run").iterdir()) == []


def test_a_failed_fresh_start_leaves_no_empty_run_directory(tmp_path):
    # a start that fails after owning the run (a missing dataset, say) must not leave an empty --out behind;
    # a directory that was already there, or that the run wrote into, stays
    rundir.own(tmp_path / "new")
    rundir.release()
    assert not (tmp_path / "new").exists()
    (tmp_path / "there").mkdir()
    rundir.own(tmp_path / "there")
    rundir.release()
    assert (tmp_path / "there").is_dir()
    rundir.own(tmp_path / "written")
    (tmp_path / "written" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    rundir.release()
    assert [p.name for p in (tmp_path / "written").iterdir()] == ["metrics.jsonl"]
    # the parent folders its mkdir made go with it, up to the first folder that was there or is not empty
    rundir.own(tmp_path / "runs" / "sweep" / "rho100")
    rundir.release()
    assert not (tmp_path / "runs").exists()
    rundir.own(tmp_path / "runs" / "sweep" / "rho100")
    (tmp_path / "runs" / "notes.txt").write_text("a sibling written meanwhile\n")
    rundir.release()
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["notes.txt"]


def test_the_lock_goes_with_a_killed_trainer_though_its_forked_children_live_on(tmp_path):
    # a trainer SIGKILLed while its DataLoader workers (forked children) still run: the run is free at once
    script = ("import os, sys, time\nfrom pathlib import Path\nfrom la import rundir\n"
              "rundir.own(Path(sys.argv[1]))\npid = os.fork()\nif pid == 0:\n    time.sleep(60)\n    os._exit(0)\n"
              "print(pid, flush=True)\ntime.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    trainer = subprocess.Popen([sys.executable, "-c", script, tmp_path / "run"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, text=True)
    child = int(trainer.stdout.readline())
    try:
        assert rundir.holder(tmp_path / "run").startswith(f"pid {trainer.pid} ")
        trainer.kill()
        trainer.wait()
        os.kill(child, 0)  # the worker outlives its parent
        assert rundir.holder(tmp_path / "run") is None
        rundir.own(tmp_path / "run")
    finally:
        rundir.release()
        os.kill(child, signal.SIGKILL)
        trainer.stdout.close()


def test_a_world_size_change_at_resume_counts_the_batches_drop_last_keeps():
    # with data.drop_last the short last batch is dropped at any world size: 12289 images are 96 batches of 128
    # in one process and in eight, so groups of 16 continue the same run
    cfg = config.build()
    cfg.model.bn_batch, cfg.data.drop_last = 16, True
    assert "world size 1 -> 8: batch norm over groups of 16 sees the same" in rundir.check_world_size(cfg, 12289, 1, 8)
    cfg.data.drop_last = False  # kept, the 1-image batch would be cut away under 8 processes
    with pytest.raises(UserError, match=r"an epoch's batches change \(97 steps"):
        rundir.check_world_size(cfg, 12289, 1, 8)
