"""Reliability: exact resume, pre-emption, atomic checkpoints, exact distributed evaluation, multi-node, bad input.

Every run here is tiny (generated CIFAR, batch 32, 1-3 epochs, one thread per process).
"""
import errno
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PROTOCOL, REPO, TINY, Payload, run, write_fake_cifar
from la import UserError, build, checkpoint, config, data, dist, engine, rundir, runtime

TORCHRUN = Path(sys.executable).parent / "torchrun"
TIMING_KEYS = {"seconds", "img_per_s", "eval_seconds"}


# ---------------------------------------------------------------- helpers

def env(**extra):
    """The environment conftest.run gives a command, for processes the tests signal themselves."""
    e = {k: v for k, v in os.environ.items() if k != "LA_DATA_ROOT"}
    e.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, **extra)
    return e


def train_args(data_root, out, *extra):
    return [REPO / "train.py", *TINY, "--data-root", data_root, "--out", out, *extra]


def popen(args, cwd, **extra_env):
    """Start a command as conftest.run would (python for a .py), for a test that signals it. `cwd` is the test's
    own folder: train.py points runs/latest under it, which must not be the repository's."""
    cmd = ([sys.executable] if str(args[0]).endswith(".py") else []) + [str(a) for a in args]
    return subprocess.Popen(cmd, cwd=cwd, env=env(**extra_env), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc, timeout=120):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes it on to its workers
        try:
            out, err = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"{proc.args} timed out\nstdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out, err


def metric_lines(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def wait_until(proc, predicate, what, timeout=120):
    """Poll until predicate() holds; fail (with the output) if proc exits first."""
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > end:
            rc, out, err = finish(proc, 5)
            raise AssertionError(f"{what} never happened (exit {rc})\nstdout:\n{out}\nstderr:\n{err}")
        time.sleep(0.005)


def untimed(lines):
    return [{k: v for k, v in json.loads(l).items() if k not in TIMING_KEYS} for l in lines]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)  # what train.py writes needs nothing more


def assert_same_state(a, b):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"weights differ: {k}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]), f"momentum differs: {k}"
    assert a["scheduler"] == b["scheduler"]
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evaluate_checkpoint(ckpt_path, data_root, ctx=dist.Context(0, 0, 1, torch.device("cpu"))):
    """la.engine.evaluate on val and test; by default in one process, the ground truth for distributed runs."""
    ckpt = load(ckpt_path)
    cfg = config.from_dict(ckpt["config"])
    cfg.data.root = str(data_root)
    splits = data.prepare(cfg.data)
    model = build.model(cfg, data.num_classes(cfg.data.dataset), ctx.device, training=False)
    model.load_state_dict(ckpt["model"])
    rt = runtime.Runtime(ctx.device, "fp32", channels_last=cfg.train.channels_last)
    return {name: engine.evaluate(model, x, y, splits.counts, ctx, rt, 64)
            for name, x, y in (("val", splits.val_x, splits.val_y), ("test", splits.test_x, splits.test_y))}


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory):
    """The fake CIFAR-10 with 101 test images: a padded shard (a duplicate) would change every metric."""
    root = write_fake_cifar(tmp_path_factory.mktemp("cifar101"), "cifar10", per_class=60, test_per_class=10)
    path = root / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as f:
        d = pickle.load(f)
    d["data"], d["labels"] = np.concatenate([d["data"], d["data"][:1]]), d["labels"] + d["labels"][:1]
    with open(path, "wb") as f:
        pickle.dump(d, f, PROTOCOL)
    return root


@pytest.fixture(scope="module")
def reference(fake_root, tmp_path_factory):
    """An uninterrupted 3-epoch run: what every interrupted-and-resumed run must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run(train_args(fake_root, out, "--epochs", "3"), cwd=out.parent)
    return out


# ---------------------------------------------------------------- 1, 3, 4: exact resume through every kind of stop

def test_resume_is_bit_exact_after_clean_stop_sigterm_and_sigkill(reference, fake_root, tmp_path):
    out = tmp_path / "run"
    ckpt_path = out / "checkpoint.pt"

    # A: stop cleanly after epoch 1 (the schedule does not depend on train.epochs, so this is an epoch-end stop)
    run(train_args(fake_root, out, "--epochs", "1"), cwd=tmp_path)
    assert (load(ckpt_path)["epoch"], load(ckpt_path)["step"]) == (1, 0)

    # B: resume; SIGTERM once epoch 2 is written, so the stop lands inside epoch 3
    proc = popen(train_args(fake_root, out, "--epochs", "3", "--resume"), tmp_path)
    wait_until(proc, lambda: len(metric_lines(out)) == 2, "epoch 2's metrics line")
    proc.send_signal(signal.SIGTERM)
    rc, stdout, stderr = finish(proc)
    assert rc == 128 + signal.SIGTERM, f"exit {rc}\n{stdout}\n{stderr}"
    assert "resuming" in stdout and "stopped by signal at epoch 3" in stdout and "Resume with:" in stdout
    assert "--resume" in stdout.split("Resume with:")[1]
    ckpt = load(ckpt_path)
    stopped_at = (ckpt["epoch"], ckpt["step"])
    assert stopped_at[0] == 2 and stopped_at[1] >= 1, "the signal should have stopped training mid-epoch"
    assert float(ckpt["partial"][2]) == 32 * ckpt["step"]  # the epoch's running sums travel with the checkpoint
    assert len(metric_lines(out)) == 2

    # C: resume; SIGKILL the moment epoch 3's line appears, i.e. while the final checkpoint is being written
    proc = popen(train_args(fake_root, out, "--epochs", "3", "--resume"), tmp_path)
    wait_until(proc, lambda: len(metric_lines(out)) == 3, "epoch 3's metrics line")
    proc.kill()
    finish(proc)
    ckpt = load(ckpt_path)  # whatever moment the kill hit, the checkpoint loads
    assert (ckpt["epoch"], ckpt["step"]) in (stopped_at, (3, 0))

    # D: resume to the end
    run(train_args(fake_root, out, "--epochs", "3", "--resume"), cwd=tmp_path)
    assert_same_state(load(ckpt_path), load(reference / "checkpoint.pt"))
    assert untimed(metric_lines(out)) == untimed(metric_lines(reference))
    assert not list(out.glob(".checkpoint.pt.*")), "a killed save's temporary file was left behind"
    # provenance.json keeps every session: the start and each resume, with where it resumed
    starts = [s["start"] for s in json.loads((out / "provenance.json").read_text())["sessions"]]
    stop = {"epoch": stopped_at[0], "step": stopped_at[1]}
    assert starts[:3] == [{"epoch": 0, "step": 0}, {"epoch": 1, "step": 0}, stop]
    assert len(starts) == 4 and starts[3] in (stop, {"epoch": 3, "step": 0})


def test_save_every_writes_only_its_epochs_and_the_last(reference, fake_root, tmp_path):
    out = tmp_path / "run"
    ckpt_path, seen, last_stat = out / "checkpoint.pt", [], None
    proc = popen(train_args(fake_root, out, "--epochs", "3", "--set", "train.save_every=2"), tmp_path)
    while proc.poll() is None:  # every checkpoint this run writes, as it appears (each is an atomic rename)
        stat = ckpt_path.stat() if ckpt_path.exists() else None
        if stat and (stat.st_ino, stat.st_mtime_ns) != last_stat:
            last_stat = (stat.st_ino, stat.st_mtime_ns)
            seen.append(load(ckpt_path)["epoch"])
        time.sleep(0.005)
    rc, stdout, stderr = finish(proc)
    assert rc == 0, stderr
    assert seen[-1:] == [3] and set(seen) <= {2, 3}, f"checkpoints written at epochs {seen}; want 2 and the last, 3"
    assert_same_state(load(ckpt_path), load(reference / "checkpoint.pt"))  # how often it saves changes nothing learned


def test_nonfinite_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(fake_root, tmp_path):
    out = tmp_path / "run"
    # lr x 1e30 from epoch 2 on: epoch 1 trains normally, epoch 2 blows up within a few steps
    proc = run(train_args(fake_root, out, "--epochs", "2", "--set", "optim.warmup_epochs=0",
                         "--set", "optim.milestones=[1]", "--set", "optim.gamma=1e30"), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss at epoch 2, step "), proc.stderr
    assert "Traceback" not in proc.stderr
    ckpt = load(out / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert len(metric_lines(out)) == 1


# ---------------------------------------------------------------- 3: atomic checkpoints under SIGKILL

KILL_LOOP = r"""
import json, os, random, signal, sys, time
import torch
from la.checkpoint import save_atomic

path, need, most = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
save_atomic({"version": 0, "w": torch.zeros(600_000)}, path)  # 2.4 MB
rng, seen = random.Random(0), []
# kill until `need` kills have landed mid-save (they leave a temporary file), however busy the machine
for k in range(most):
    if sum(s["leftovers"] for s in seen) >= need:
        break
    pid = os.fork()
    if pid == 0:  # the child saves new versions as fast as it can until it is killed
        v = (k + 1) * 1_000_000
        while True:
            v += 1
            save_atomic({"version": v, "w": torch.full((600_000,), float(v))}, path)
    time.sleep(rng.uniform(0.0, 0.15))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    try:
        ckpt = torch.load(path, weights_only=True)
        version, intact = ckpt["version"], bool((ckpt["w"] == float(ckpt["version"])).all())
    except Exception as e:
        version, intact = repr(e), False
    leftovers = [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]
    seen.append({"version": version, "intact": intact, "leftovers": len(leftovers)})
    for n in leftovers:
        os.unlink(os.path.join(os.path.dirname(path), n))
print(json.dumps(seen))
"""


def test_save_atomic_survives_sigkill_at_random_moments(tmp_path):
    script = tmp_path / "kill_loop.py"
    script.write_text(KILL_LOOP)
    proc = run([script, tmp_path / "ckpt.pt", 5, 200], cwd=tmp_path, timeout=120)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(s["intact"] for s in seen), seen
    versions = [s["version"] for s in seen]
    assert versions == sorted(versions), "a kill must never bring back an older checkpoint"
    assert sum(s["leftovers"] for s in seen) >= 5, f"too few kills landed mid-save to prove anything: {seen}"


# ---------------------------------------------------------------- 4, 5: torchrun pre-emption and exact distributed evaluation

def worker_pids(agent_pid):
    """{rank: pid} of the workers torchrun started."""
    kids = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    ranks = {}
    for pid in kids:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0])] = int(pid)
    return ranks


def test_torchrun_sigterm_on_one_rank_stops_all_then_resume_and_exact_eval(odd_root, tmp_path):
    out = tmp_path / "run"
    cmd = lambda *extra: [TORCHRUN, "--nproc_per_node=2", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
                          *train_args(odd_root, out, "--epochs", "2", *extra)]
    proc = popen(cmd(), tmp_path)
    wait_until(proc, lambda: len(metric_lines(out)) == 1, "epoch 1's metrics line")
    os.kill(worker_pids(proc.pid)[1], signal.SIGTERM)  # only rank 1 is told: rank 0 must stop with it
    rc, stdout, stderr = finish(proc)
    assert rc != 0
    assert stdout.count("stopped by signal at epoch 2") == 1 and "Resume with:" in stdout, stdout + stderr
    assert "torchrun --nproc_per_node=2" in stdout.split("Resume with:")[1]
    ckpt = load(out / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and ckpt["step"] >= 1
    assert float(ckpt["partial"][2]) == 32 * ckpt["step"], "rank 0 must carry both ranks' running sums"

    rc, stdout, stderr = finish(popen(cmd("--resume"), tmp_path))
    assert rc == 0, stdout + stderr
    final = json.loads(metric_lines(out)[-1])
    assert final["epoch"] == 2 and len(metric_lines(out)) == 2
    # Two ranks, 101 test images: equal to one process exactly, so no image was dropped or counted twice.
    truth = evaluate_checkpoint(out / "checkpoint.pt", odd_root)
    for split in ("val", "test"):
        for key in ("top1", "balanced_acc"):
            assert final[f"{split}_{key}"] == truth[split][key], (split, key)

    # The same checkpoint through la.engine on two ranks: every per-class figure equal, too.
    helper = tmp_path / "dist_eval.py"
    helper.write_text(DIST_EVAL)
    run([TORCHRUN, "--nproc_per_node=2", "--master-addr=127.0.0.1", f"--master-port={free_port()}", helper,
         out / "checkpoint.pt", odd_root, tmp_path / "dist_eval.json"], cwd=tmp_path)
    two = json.loads((tmp_path / "dist_eval.json").read_text())
    for split in ("val", "test"):
        for key in ("top1", "balanced_acc", "per_class", "many", "medium", "few"):
            assert two[split][key] == truth[split][key], (split, key)
        assert two[split]["nll"] == pytest.approx(truth[split]["nll"], rel=1e-6)  # sums of floats: order may differ
        assert two[split]["ece"] == pytest.approx(truth[split]["ece"], rel=1e-6, abs=1e-9)


def restartable(out, nproc, *args):
    return [TORCHRUN, f"--nproc_per_node={nproc}", "--max-restarts=1", "--monitor-interval=0.1",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}",
            *train_args(*args), "--set", "train.save_every=1"]


def test_a_worker_torchrun_restarts_resumes_its_run_bit_exactly(reference, fake_root, tmp_path):
    out = tmp_path / "run"
    proc = popen(restartable(out, 1, fake_root, out, "--epochs", "3"), tmp_path)
    wait_until(proc, lambda: len(metric_lines(out)) == 2, "epoch 2's metrics line")
    os.kill(json.loads((out / rundir.OWNER).read_text())["pid"], signal.SIGKILL)  # the worker, rank 0, owns the run
    rc, stdout, stderr = finish(proc)
    assert rc == 0, stdout + stderr
    assert "torchrun restart 1: continuing from the last checkpoint" in stdout and "resuming" in stdout, stdout
    assert_same_state(load(out / "checkpoint.pt"), load(reference / "checkpoint.pt"))
    assert untimed(metric_lines(out)) == untimed(metric_lines(reference))
    assert not (out / rundir.OWNER).exists()  # released at the end


def test_two_workers_one_killed_before_any_checkpoint_start_afresh(fake_root, tmp_path):
    out = tmp_path / "run"
    proc = popen(restartable(out, 2, fake_root, out, "--epochs", "1"), tmp_path)
    wait_until(proc, lambda: (out / rundir.OWNER).exists() and 1 in worker_pids(proc.pid), "rank 0 owning the run")
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
    rc, stdout, stderr = finish(proc)
    assert rc == 0, stdout + stderr
    assert "torchrun restart 1: no checkpoint saved yet, so the run starts afresh" in stdout, stdout
    assert [json.loads(l)["epoch"] for l in metric_lines(out)] == [1]
    assert load(out / "checkpoint.pt")["epoch"] == 1


DIST_EVAL = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from la import dist
from test_reliability import evaluate_checkpoint

ctx = dist.setup("cpu")
metrics = evaluate_checkpoint(sys.argv[1], sys.argv[2], ctx)
if ctx.is_main:
    json.dump(metrics, open(sys.argv[3], "w"))
dist.teardown()
"""


# ---------------------------------------------------------------- 5, 6: multi-node on loopback; identical data on every rank

def two_nodes(args, port, cwd, node_env=({}, {})):
    procs = [popen([TORCHRUN, "--nnodes=2", "--nproc_per_node=1", f"--node-rank={k}", "--master-addr=127.0.0.1",
                    f"--master-port={port}", *args], cwd, **node_env[k]) for k in (0, 1)]
    return [finish(p, timeout=150) for p in procs]


def test_two_nodes_on_loopback_train_and_evaluate_exactly(odd_root, tmp_path):
    out = tmp_path / "run"
    results = two_nodes(train_args(odd_root, out, "--epochs", "1"), free_port(), tmp_path)
    for k, (rc, stdout, stderr) in enumerate(results):
        assert rc == 0, f"node {k}\n{stdout}\n{stderr}"
    assert "2 x cpu" in results[0][1]
    (line,) = metric_lines(out)
    final = json.loads(line)
    assert "test_top1" in final and "val_top1" in final
    run([REPO / "eval.py", out, "--data-root", odd_root], cwd=tmp_path)  # one process
    report = json.loads((out / "eval.json").read_text())
    for split in ("val", "test"):
        for key in ("top1", "balanced_acc"):
            assert final[f"{split}_{key}"] == report[split]["raw"][key], (split, key)


@pytest.mark.parametrize("node1_data", ["different", "missing"])
def test_a_node_with_other_or_no_data_fails_loudly_at_startup(fake_root, tmp_path, node1_data):
    if node1_data == "different":  # same shapes and class counts, other images: only the hashes tell
        node1_root = write_fake_cifar(tmp_path / "other", "cifar10", per_class=60, test_per_class=10, seed=1)
    else:
        node1_root = tmp_path / "empty"
        node1_root.mkdir()
    out = tmp_path / "run"
    args = train_args(fake_root, out, "--epochs", "1")
    args = args[:args.index("--data-root")] + args[args.index("--data-root") + 2:]  # each node its own LA_DATA_ROOT
    (rc0, _, err0), (rc1, _, err1) = two_nodes(args, free_port(), tmp_path,
                                                       ({"LA_DATA_ROOT": str(fake_root)}, {"LA_DATA_ROOT": str(node1_root)}))
    assert rc0 != 0 and rc1 != 0
    errors0 = [l for l in err0.splitlines() if l.startswith("error: ")]
    errors1 = [l for l in err1.splitlines() if l.startswith("error: ")]
    if node1_data == "different":
        assert len(errors0) == 1 and errors0[0].startswith("error: split manifest differs between ranks: rank 0: {"), err0
        assert "train_index_sha256" in errors0[0] and "test_size" not in errors0[0], errors0[0]
    else:  # node 1 says what is wrong; node 0 says where to look, not a gloo traceback
        assert errors1 == [errors1[0]] and errors1[0].startswith("error: rank 1: cifar10 not found"), err1
        assert len(errors0) == 1 and "one of them failed during start-up" in errors0[0], err0
        assert "[rank0]: Traceback" not in err0
    assert not (out / "checkpoint.pt").exists() and not metric_lines(out)


# ---------------------------------------------------------------- 2, 8: bad input, table-driven

DRIVER = r"""
# Runs many `python SCRIPT ARGV` invocations in one interpreter (torch imported once), as `python` would:
# exit status from SystemExit, anything else uncaught printed as a traceback with status 1.
import contextlib, io, json, os, runpy, sys, traceback
cases_path, results_path = sys.argv[1:3]
cases, results = json.load(open(cases_path)), {}
for case in cases:
    saved = dict(os.environ)
    os.environ.update(case["env"])
    os.chdir(case["cwd"])
    sys.argv = [case["script"]] + case["argv"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(case["script"], run_name="__main__")
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            rc = 1
    os.environ.clear()
    os.environ.update(saved)
    results[case["id"]] = {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}
json.dump(results, open(results_path, "w"))
"""


def then(_, *argv):
    """For a table entry: do the damage (the first argument), then pass argv."""
    return list(argv)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path):
    path.write_bytes(bytes(random.Random(1).randrange(256) for _ in range(4096)))


def _bad_yaml(d, text):
    (d.case / "recipe.yaml").write_text(text)
    return ["--config", d.case / "recipe.yaml", "--overwrite"]


def _data_copy(d, damage):
    root = d.case / "data"
    shutil.copytree(d.data / "cifar-10-batches-py", root / "cifar-10-batches-py")
    damage(root / "cifar-10-batches-py")
    return ["--data-root", root]


def _doctored_checkpoint(d, edit):
    ckpt = load(d.run / "checkpoint.pt")
    edit(ckpt)
    torch.save(ckpt, d.run / "checkpoint.pt")
    return [d.run]


def _other_dataset(ckpt):
    ckpt["config"]["data"]["dataset"] = "cifar100"  # 10-class weights under a 100-class name
    del ckpt["split_manifest"]


def _planted_checkpoint(d):
    """The run's own checkpoint with one more entry, a Payload: every key the loader looks for is there."""
    return _doctored_checkpoint(d, lambda ckpt: ckpt.update(note=Payload(d.case / "pwned")))


def _planted_cache(d):
    torch.save({"checkpoint_sha256": checkpoint.file_sha256(d.run / "checkpoint.pt"), "splits": Payload(d.case / "pwned")},
               d.run / "logits.pt")
    return [d.run]


def _planted_batch(b):
    (b / "data_batch_2").write_bytes(pickle.dumps({"data": Payload(b.parent.parent / "pwned"), "labels": [0]}, PROTOCOL))


def _label_out_of_range(b):
    with open(b / "data_batch_4", "rb") as f:
        batch = pickle.load(f)
    batch["labels"][3] = 12  # CIFAR-10 has labels 0..9
    (b / "data_batch_4").write_bytes(pickle.dumps(batch, PROTOCOL))


def _locked(d, *argv):
    """The run owned by another process (this test process) while the command runs."""
    rundir.own(d.run)
    return list(argv)


def _file_in_the_way(d):
    (d.case / "afile").write_text("not a folder\n")
    return ["--out", d.case / "afile" / "run"]


def _run_with_an_empty_class(d):
    """The run as if trained with rho 61 before such a rho was refused: class 9 (of 60 images) has none."""
    def edit(ckpt):
        ckpt["config"]["data"]["rho"] = 61.0
        cfg = config.from_dict(ckpt["config"])
        cfg.data.root = str(d.data)
        splits = data.prepare(cfg.data, allow_empty_classes=True)
        ckpt["split_manifest"], ckpt["class_counts"] = splits.manifest, splits.counts
    return _doctored_checkpoint(d, edit)


def _cache_with_an_empty_class(d):
    """That run's logits cache, as eval.py writes it: eval.py reads the class counts from there."""
    _run_with_an_empty_class(d)
    ckpt = load(d.run / "checkpoint.pt")
    logits = {split: (torch.randn(20, 10), torch.arange(20) % 10) for split in ("val", "test")}
    torch.save({"checkpoint_sha256": checkpoint.file_sha256(d.run / "checkpoint.pt"), "splits": logits,
                "class_counts": ckpt["class_counts"], "config": ckpt["config"]}, d.run / "logits.pt")
    return [d.run]


# (id, script, setup(d) -> extra argv, expected error). train.py cases get TINY, --data-root and --out d.run
# (a finished run) first; later flags win. --overwrite makes the error under test, not the refusal, fire.
CASES = [
    ("unknown-flag", "train", lambda d: ["--frobnicate", "3"], "unrecognized arguments: --frobnicate"),
    ("unknown-key", "train", lambda d: ["--set", "train.frobnicate=1", "--overwrite"], "unknown config key 'train.frobnicate'"),
    ("unknown-key-in-recipe", "train", lambda d: _bad_yaml(d, "train:\n  frobnicate: 1\n"), "unknown config key"),
    ("recipe-not-yaml", "train", lambda d: _bad_yaml(d, "train: [unclosed\n"), "not valid YAML"),
    ("missing-recipe", "train", lambda d: ["--config", d.case / "nope.yaml"], "config file not found"),
    ("set-without-value", "train", lambda d: ["--set", "train.epochs"], "--set expects key=value"),
    ("wrong-type-set", "train", lambda d: ["--set", "train.epochs=ten", "--overwrite"], "train.epochs: expected int"),
    ("wrong-type-flag", "train", lambda d: ["--rho", "abc", "--overwrite"], "data.rho: expected float"),
    ("wrong-type-in-recipe", "train", lambda d: _bad_yaml(d, "train:\n  batch_size: 12.5\n"), "train.batch_size: expected int"),
    ("rho-below-1", "train", lambda d: ["--rho", "0.5", "--overwrite"], "data.rho must be >= 1"),
    ("rho-inf", "train", lambda d: ["--rho", "inf", "--overwrite"], "data.rho must be a finite number, got inf"),
    ("rho-nan", "train", lambda d: ["--rho", "nan", "--overwrite"], "data.rho must be a finite number, got nan"),
    # the generated CIFAR has 60 (CIFAR-10) and 12 (CIFAR-100) training images per class
    ("rho-empties-a-class", "train", lambda d: ["--rho", "61", "--overwrite"],
     "data.rho=61 leaves class 9 of cifar10 without a training image (60 per class); the largest rho it allows is 60"),
    ("rho-empties-cifar100-classes", "train", lambda d: ["--dataset", "cifar100", "--rho", "100", "--overwrite"],
     "data.rho=100 leaves class 54 (and 45 more) of cifar100 without a training image (12 per class); the largest rho it allows is 12"),
    ("step-rho-empties-classes", "train", lambda d: ["--set", "data.profile=step", "--rho", "100", "--overwrite"],
     "data.rho=100 leaves class 5 (and 4 more) of cifar10"),
    ("tau-nan", "train", lambda d: ["--loss", "la", "--tau", "nan", "--overwrite"], "loss.tau must be a finite number, got nan"),
    ("lr-negative", "train", lambda d: ["--set", "optim.lr=-0.1", "--overwrite"], "optim.lr must be > 0"),
    ("lr-nan", "train", lambda d: ["--set", "optim.lr=.nan", "--overwrite"], "optim.lr must be a finite number, got nan"),
    ("momentum-negative", "train", lambda d: ["--set", "optim.momentum=-0.9", "--overwrite"], "optim.momentum must be in [0, 1)"),
    ("momentum-one", "train", lambda d: ["--set", "optim.momentum=1", "--overwrite"], "optim.momentum must be in [0, 1)"),
    ("nesterov-without-momentum", "train", lambda d: ["--set", "optim.nesterov=true", "--set", "optim.momentum=0", "--overwrite"],
     "optim.nesterov=true needs optim.momentum > 0"),
    ("weight-decay-negative", "train", lambda d: ["--set", "optim.weight_decay=-5e-4", "--overwrite"], "optim.weight_decay must be >= 0"),
    ("weight-decay-inf", "train", lambda d: ["--set", "optim.weight_decay=inf", "--overwrite"], "optim.weight_decay must be a finite number"),
    ("decay-params-match-nothing", "train", lambda d: ["--set", "optim.decay_params=*conv*.weight fc.wieght", "--overwrite"],
     "optim.decay_params: 'fc.wieght' matches no parameter of the model"),
    ("decay-params-empty", "train", lambda d: ["--set", "optim.decay_params= ", "--overwrite"], "optim.decay_params must name"),
    ("crop-pad-negative", "train", lambda d: ["--set", "data.crop_pad=-2", "--overwrite"], "data.crop_pad must be in 0..16"),
    ("unknown-normalize", "train", lambda d: ["--set", "data.normalize=imagenet", "--overwrite"],
     "data.normalize: 'imagenet' is not one of mean_std, center"),
    ("gamma-zero", "train", lambda d: ["--set", "optim.gamma=0", "--overwrite"], "optim.gamma must be > 0"),
    ("warmup-negative", "train", lambda d: ["--set", "optim.warmup_epochs=-1", "--overwrite"], "optim.warmup_epochs must be >= 0"),
    ("milestones-unsorted", "train", lambda d: ["--set", "optim.milestones=[300,100]", "--overwrite"],
     "optim.milestones must be increasing epochs >= 0, got [300, 100]"),
    ("milestones-repeated", "train", lambda d: ["--set", "optim.milestones=[100,100]", "--overwrite"], "optim.milestones must be increasing"),
    ("milestones-negative", "train", lambda d: ["--set", "optim.milestones=[-5]", "--overwrite"], "optim.milestones must be increasing epochs >= 0"),
    ("seed-negative", "train", lambda d: ["--seed", "-1", "--overwrite"], "train.seed must be in 0..2147483647"),
    ("subset-seed-too-large", "train", lambda d: ["--set", "data.subset_seed=4294967295", "--overwrite"],
     "data.subset_seed must be in 0..2147483647"),
    ("zero-eval-batch-size", "train", lambda d: ["--set", "train.eval_batch_size=0", "--overwrite"], "train.eval_batch_size must be >= 1"),
    ("workers-negative", "train", lambda d: ["--set", "data.workers=-1", "--overwrite"], "data.workers must be >= 0"),
    ("zero-epochs", "train", lambda d: ["--epochs", "0", "--overwrite"], "train.epochs must be >= 1"),
    ("unknown-dataset", "train", lambda d: ["--dataset", "cifar1000", "--overwrite"], "data.dataset: 'cifar1000' is not one of"),
    ("unknown-model", "train", lambda d: ["--set", "model.name=vgg16", "--overwrite"], "model.name: 'vgg16' is not one of"),
    ("unknown-loss", "train", lambda d: ["--loss", "focal", "--overwrite"], "loss.name: 'focal' is not one of"),
    ("data-missing-download-off", "train", lambda d: ["--data-root", d.case / "empty", "--set", "data.download=false", "--overwrite"],
     "cifar10 not found"),
    ("data-missing-no-network", "train", lambda d: ["--data-root", d.case / "empty", "--set", "data.download=true", "--overwrite"],
     "download failed"),
    ("data-truncated", "train", lambda d: [*_data_copy(d, lambda b: _truncate(b / "data_batch_3")), "--overwrite"], "corrupt CIFAR file"),
    ("data-corrupt", "train", lambda d: [*_data_copy(d, lambda b: _garble(b / "test_batch")), "--overwrite"], "corrupt CIFAR file"),
    ("data-wrong-shape", "train", lambda d: [*_data_copy(d, lambda b: (b / "data_batch_1").write_bytes(
        pickle.dumps({"data": np.zeros((5, 7), np.uint8), "labels": [0] * 5}, PROTOCOL))), "--overwrite"], "corrupt CIFAR file"),
    # a pickle that would run code when loaded: refused by name, and nothing runs (no file "pwned" appears)
    ("data-planted", "train", lambda d: [*_data_copy(d, _planted_batch), "--overwrite"], "data_batch_2 was not loaded: it asks to import io.open"),
    ("resume-planted-checkpoint", "train", lambda d: then(_planted_checkpoint(d), "--resume"),
     "checkpoint.pt was not loaded: it asks to import io.open"),
    ("eval-planted-checkpoint", "eval", _planted_checkpoint, "checkpoint.pt was not loaded: it asks to import io.open"),
    ("eval-planted-logits-cache", "eval", _planted_cache, "logits.pt was not loaded: it asks to import io.open"),
    ("eval-planted-data", "eval", lambda d: [d.run, *_data_copy(d, _planted_batch)], "data_batch_2 was not loaded"),
    ("existing-run", "train", lambda d: [], "already holds a run"),
    # one trainer per run: whichever flags a second one passes, it stops before touching anything
    ("locked-run", "train", _locked, f"is being trained by pid {os.getpid()} on host {socket.gethostname()} since "),
    ("locked-run-resume", "train", lambda d: _locked(d, "--resume"), f"is being trained by pid {os.getpid()} on host"),
    ("locked-run-overwrite", "train", lambda d: _locked(d, "--overwrite"), f"is being trained by pid {os.getpid()} on host"),
    ("out-under-a-file", "train", _file_in_the_way, "afile/run as a run directory: Not a directory"),
    ("data-label-out-of-range", "train", lambda d: [*_data_copy(d, _label_out_of_range), "--overwrite"],
     "data_batch_4: image 3 has label 12, outside 0..9"),
    ("eval-plot-folder-missing", "eval", lambda d: [d.run, "--plot", d.case / "missing" / "p.png"], "/missing does not exist"),
    ("resume-and-overwrite", "train", lambda d: ["--resume", "--overwrite"], "pass one of them"),
    ("resume-without-checkpoint", "train", lambda d: ["--out", d.case / "fresh", "--resume"], "no checkpoint"),
    ("resume-truncated-checkpoint", "train", lambda d: then(_truncate(d.run / "checkpoint.pt"), "--resume"), "truncated or corrupt"),
    ("resume-corrupt-checkpoint", "train", lambda d: then(_garble(d.run / "checkpoint.pt"), "--resume"), "truncated or corrupt"),
    ("resume-foreign-checkpoint", "train", lambda d: then(torch.save({"weights": 1}, d.run / "checkpoint.pt"), "--resume"), "lacks"),
    ("resume-other-dataset", "train", lambda d: ["--dataset", "cifar100", "--resume"], "data.dataset='cifar10'"),
    ("resume-other-recipe", "train", lambda d: ["--loss", "la", "--resume"], "loss.name='ce'"),
    ("batch-not-divisible", "train", lambda d: ["--set", "train.batch_size=33", "--overwrite"], "global batch 33 is not divisible by world size 2"),
    ("negative-bn-batch", "train", lambda d: ["--set", "model.bn_batch=-16", "--overwrite"], "model.bn_batch must be >= 0"),
    ("cuda-graph-on-cpu", "train", lambda d: ["--set", "train.cuda_graph=true", "--device", "cpu", "--overwrite"],
     "train.cuda_graph=true needs a CUDA device"),
    ("val-larger-than-pool", "train", lambda d: ["--set", "data.val_per_class=1000", "--overwrite"], "val_per_class=1000 is larger than"),
    ("eval-no-run", "eval", lambda d: [d.case / "nowhere"], "no run at"),
    ("eval-run-without-checkpoint", "eval", lambda d: then((d.run / "checkpoint.pt").unlink(), d.run), "holds no checkpoint.pt"),
    ("eval-truncated-checkpoint", "eval", lambda d: then(_truncate(d.run / "checkpoint.pt"), d.run), "truncated or corrupt"),
    ("eval-corrupt-checkpoint", "eval", lambda d: then(_garble(d.run / "checkpoint.pt"), d.run), "truncated or corrupt"),
    ("eval-foreign-checkpoint", "eval", lambda d: _doctored_checkpoint(d, lambda c: c.pop("model")), "lacks model"),
    ("eval-class-count-mismatch", "eval", lambda d: _doctored_checkpoint(d, _other_dataset), "does not fit a resnet8"),
    ("eval-other-data", "eval", lambda d: [d.run, "--data-root", d.odd], "does not give the split"),
    ("eval-data-missing", "eval", lambda d: [d.run, "--data-root", d.case / "empty"], "cifar10 not found"),
    ("eval-negative-tau", "eval", lambda d: [d.run, "--posthoc", "--tau", "-1"], "--tau -1 is negative"),
    ("eval-nan-tau", "eval", lambda d: [d.run, "--posthoc", "--tau", "nan"], "--tau must be a finite number, got nan"),
    ("eval-inf-tau", "eval", lambda d: [d.run, "--posthoc", "--tau", "inf"], "--tau must be a finite number, got inf"),
    ("eval-infinite-sweep", "eval", lambda d: [d.run, "--tau-sweep", "--taus", "0:inf:0.5"], "need finite numbers"),
    ("eval-endless-sweep", "eval", lambda d: [d.run, "--tau-sweep", "--taus", "0:3:1e-12"], "more than 10,000 values"),
    ("eval-zero-batch-size", "eval", lambda d: [d.run, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    # runs trained before an emptying rho was refused: post-hoc adjustment would subtract log(0)
    ("eval-posthoc-empty-class", "eval", lambda d: [*_run_with_an_empty_class(d), "--posthoc"],
     "class 9 had no training image, so its log-prior is -inf"),
    ("eval-sweep-empty-class-cached", "eval", lambda d: [*_cache_with_an_empty_class(d), "--tau-sweep"], "class 9 had no training image"),
    ("eval-unknown-flag", "eval", lambda d: [d.run, "--frobnicate"], "unrecognized arguments"),
    ("eval-bad-tau-grid", "eval", lambda d: [d.run, "--taus", "1:0:0.5"], "need finite numbers, STEP > 0 and STOP >= START"),
    ("eval-unknown-tau-rule", "eval", lambda d: [d.run, "--tau-rule", "best"], "invalid choice: 'best'"),
]
# (id, script, setup, ""): inputs near the bad ones that must work
ALLOWED = [
    ("eval-negative-tau-allowed", "eval", lambda d: [d.run, "--posthoc", "--tau", "-1", "--allow-negative-tau"], ""),
    ("eval-raw-empty-class", "eval", _run_with_an_empty_class, ""),
    ("eval-training-run", "eval", lambda d: _locked(d, d.run), ""),
]
CASE_ENV = {
    # no network: every HTTP(S) request goes to a closed local port
    "data-missing-no-network": {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
                                "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": ""},
    # what torchrun would set for a 2-process job; the check must fire before any rendezvous
    "batch-not-divisible": {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
}


class Dirs:
    def __init__(self, case, run, data, odd):
        self.case, self.run, self.data, self.odd = case, run, data, odd


def snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(Path(root).rglob("*"))}


@pytest.fixture(scope="module")
def bad_input_results(reference, fake_root, odd_root, tmp_path_factory):
    """Set every case up, run them all in one interpreter, return {id: (result, snapshot before, after)}."""
    base = tmp_path_factory.mktemp("bad_input")
    specs, before = [], {}
    for case_id, script, setup, _ in CASES + ALLOWED:
        d = Dirs(base / case_id, base / case_id / "run", fake_root, odd_root)
        shutil.copytree(reference, d.run)
        (d.case / "empty").mkdir()
        extra = [str(a) for a in setup(d)]
        argv = ([*TINY, "--data-root", str(fake_root), "--out", str(d.run), "--epochs", "1"] if script == "train" else []) + extra
        specs.append({"id": case_id, "script": str(REPO / f"{script}.py"), "argv": argv, "cwd": str(d.case),
                      "env": CASE_ENV.get(case_id, {})})
        before[case_id] = snapshot(d.case)
    (base / "cases.json").write_text(json.dumps(specs))
    driver = base / "driver.py"
    driver.write_text(DRIVER)
    try:
        run([driver, base / "cases.json", base / "results.json"], cwd=base, timeout=240)
        results = json.loads((base / "results.json").read_text())
        return {i: (results[i], before[i], snapshot(base / i)) for i in results}
    finally:
        rundir.release()  # the _locked cases' runs


@pytest.mark.parametrize("case_id,expected", [(c[0], c[3]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_touches_nothing(bad_input_results, case_id, expected):
    result, before, after = bad_input_results[case_id]
    stderr = result["stderr"]
    assert result["rc"] != 0, f"exit 0\nstdout:\n{result['stdout']}\nstderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0], lines[0]
    assert before == after, "files changed or appeared: " + ", ".join(
        sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)))


def test_negative_tau_is_allowed_with_its_flag(bad_input_results):
    result, _, _ = bad_input_results["eval-negative-tau-allowed"]
    assert result["rc"] == 0, result["stderr"]
    assert "post-hoc tau=-1" in result["stdout"]


def test_a_run_with_an_empty_class_still_evaluates_raw(bad_input_results):
    result, _, _ = bad_input_results["eval-raw-empty-class"]
    assert result["rc"] == 0, result["stderr"]
    assert "    9:     0" in result["stdout"]  # the per-class table shows its 0 training images


def test_eval_reads_a_run_in_training_and_writes_none_of_its_files(bad_input_results):
    result, before, after = bad_input_results["eval-training-run"]
    assert result["rc"] == 0, result["stderr"]
    assert f"it is training now (pid {os.getpid()} on host" in result["stdout"]
    written = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert "run/eval.json" in written and written <= {"run/eval.json", "run/logits.pt", "run/features.pt"}, written
    assert not written & {f"run/{f}" for f in rundir.FILES[:6]}  # none of the files training writes


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"epoch": 1}, path)
    old = path.read_bytes()

    def full_disk(obj, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match=r"could not write .*checkpoint.pt \(No space left on device\); the previous "
                                        r"checkpoint.pt is kept whole$"):
        checkpoint.save_atomic({"epoch": 2}, path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_floats_without_a_dot_are_floats_not_type_errors():
    # YAML 1.1 reads 5e-4 as a string; a recipe or --set value written that way is still a number
    cfg = config.build(overrides=[("optim.weight_decay", "5e-4"), ("optim.gamma", "1e30"), ("loss.tau", "1")])
    assert (cfg.optim.weight_decay, cfg.optim.gamma, cfg.loss.tau) == (5e-4, 1e30, 1.0)


# ---------------------------------------------------------------- loading never runs code

def test_the_planted_payload_is_live(tmp_path):
    """What the planted rows above stand on: loaded the unsafe way, a Payload does create its file."""
    torch.save({"model": {}, "note": Payload(tmp_path / "by_torch_load")}, tmp_path / "planted.pt")
    torch.load(tmp_path / "planted.pt", weights_only=False)
    pickle.loads(pickle.dumps({"data": Payload(tmp_path / "by_pickle_load"), "labels": []}, PROTOCOL))
    assert (tmp_path / "by_torch_load").exists() and (tmp_path / "by_pickle_load").exists()


def test_rng_states_are_plain_data_and_restore_every_generator():
    draws = lambda: (random.random(), float(np.random.rand()), float(np.random.randn()), float(torch.rand(1)))
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # numpy draws normals in pairs: the state now caches the second one
    buffer = io.BytesIO()
    torch.save(checkpoint.rng_state(), buffer)
    expected = draws()
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert isinstance(state["numpy"][1], list)
    checkpoint.set_rng_state(state)
    assert draws() == expected
    # the form older checkpoints hold: numpy's key as a uint32 array
    state["numpy"] = (state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:])
    checkpoint.set_rng_state(state)
    assert draws() == expected


def test_checkpoints_from_before_plain_rng_states_still_load(tmp_path):
    """Checkpoints written before RNG states were plain data hold numpy's state as numpy.random.get_state() gives it,
    its key a uint32 array (results/ kept one such run until issue 23): checkpoint.load admits that, and nothing more."""
    state = checkpoint.rng_state()
    state["numpy"] = np.random.get_state()  # the old form
    path = tmp_path / "old.pt"
    torch.save({"model": torch.nn.Linear(3, 2).state_dict(), "config": {}, "class_counts": [2, 1], "epoch": 200, "step": 0,
                "rng": state}, path)
    with pytest.raises(pickle.UnpicklingError):  # it holds a numpy array ...
        torch.load(path, map_location="cpu", weights_only=True)
    ckpt = checkpoint.load(path)  # ... which checkpoint.load admits
    kind, key, *_ = ckpt["rng"]["numpy"]
    assert kind == "MT19937" and key.dtype == np.uint32 and key.shape == (624,)
    np.random.set_state(ckpt["rng"]["numpy"])


def test_a_stop_on_an_epochs_last_step_saves_the_whole_epoch(fake_root, tmp_path, monkeypatch):
    """A signal caught on the last step of an epoch: the epoch is logged (its lr too) and saved as finished, not
    as `step == steps` of it, which the resumed session used to log with "lr": null."""
    import signal

    sys.path.insert(0, str(REPO))
    import train
    from la import UserError, engine

    real = engine.train_epoch

    def signal_before_the_last_step(t, batches, meter, stop=None, step=0, bar=None):
        items = list(batches)

        def feed():
            for i, b in enumerate(items):
                if i == len(items) - 1 and t.scheduler.last_epoch < len(items):  # the first epoch's last step
                    stop.signum = signal.SIGTERM
                yield b
        return real(t, feed(), meter, stop, step, bar)

    monkeypatch.setattr(engine, "train_epoch", signal_before_the_last_step)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    argv = ["--data-root", str(fake_root), "--out", str(out), "--epochs", "2"] + TINY
    try:
        assert train.main(argv) == 128 + signal.SIGTERM
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert (ckpt["epoch"], ckpt["step"]) == (1, 0) and ckpt["world_size"] == 1
        torch.save({**ckpt, "world_size": 2}, out / "checkpoint.pt")  # as if trained by 2 processes
        with pytest.raises(UserError, match=r"trained by 2 process\(es\) but 1 resume it"):
            train.main(argv + ["--resume"])
        torch.save(ckpt, out / "checkpoint.pt")
        assert train.main(argv + ["--resume"]) == 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and all(m["lr"] is not None for m in lines)


def test_another_world_size_at_resume_is_refused_unless_nothing_depends_on_it(tmp_path):
    from la import UserError, config as cfgs, rundir

    cfg = cfgs.build()  # the paper recipe: batch 128, batch norm over each process's batch
    n = 12288 + 64  # 96 batches of 128 and one of 64
    assert rundir.check_world_size(cfg, n, 2, 2) is None
    with pytest.raises(UserError, match=r"trained by 1 process\(es\) but 2 resume it, and batch norm normalises"):
        rundir.check_world_size(cfg, n, 1, 2)
    cfg.model.bn_batch = 16  # groups of 16 fit 128, 64, 32 and 16 images per process alike
    assert "world size 1 -> 2: batch norm over groups of 16 sees the same" in rundir.check_world_size(cfg, n, 1, 2)
    assert "world size 4 -> 1" in rundir.check_world_size(cfg, n, 4, 1)
    with pytest.raises(UserError, match="would cut some batch into other groups"):
        rundir.check_world_size(cfg, 12386, 1, 2)  # the last 98 images: 7 x 14 in one process, 2 x (13, 12, 12, 12) in two
    with pytest.raises(UserError, match=r"an epoch's batches change \(97 steps, last of 1 images; now 96"):
        rundir.check_world_size(cfg, 12288 + 1, 1, 8)  # the 1-image batch is dropped under 8 processes
    with pytest.raises(UserError, match="would cut some batch into other groups"):
        rundir.check_world_size(cfg, n, 1, 16)  # 8 images per process: one group of 8, not half of one of 16
    assert "does not record its world size" in rundir.check_world_size(cfg, n, None, 2)
    # a checkpoint from before the field: what provenance.json's last session recorded, else unknown
    assert rundir.recorded_world_size(tmp_path, {"world_size": 4}) == 4
    assert rundir.recorded_world_size(tmp_path, {}) is None
    (tmp_path / "provenance.json").write_text(json.dumps({"sessions": [{"world_size": 1}, {"world_size": 2}]}))
    assert rundir.recorded_world_size(tmp_path, {}) == 2
