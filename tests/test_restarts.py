"""Which run a worker that torchrun restarted continues: only one its own job started (in-process, no training)."""
import json

import pytest

from la import UserError, rundir


@pytest.fixture
def restarted(monkeypatch):
    """The environment of a single-node torchrun worker after one restart."""
    for k, v in {"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "1",
                 "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
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
