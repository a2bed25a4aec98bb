"""train.py and eval.py as users run them, on tiny generated data."""
import json
import os
import shutil
import sys

import pytest
import torch

from conftest import REPO, TINY, eval_in_process, run
from la import hardware, runtime, tausweep


@pytest.fixture(scope="module")
def two_runs(fake_root, tmp_path_factory):
    """A CE run under torchrun with 2 processes (default run dir, runs/latest) and a 1-process LA run."""
    cwd = tmp_path_factory.mktemp("work")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ce = run(torchrun + [REPO / "train.py", "--data-root", fake_root, "--epochs", "2", "--loss", "ce"] + TINY, cwd)
    la = run([REPO / "train.py", "--data-root", fake_root, "--epochs", "2", "--loss", "la"] + TINY, cwd)
    return cwd, ce, la


def test_torchrun_training_writes_the_run_directory(two_runs):
    cwd, ce, _ = two_runs
    run_dir = cwd / "runs" / "cifar10-lt_rho10_ce_s0"
    assert "2 x cpu" in ce.stdout
    assert ce.stdout.count("epoch ") >= 2, "only rank 0 prints, once per epoch"
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert {"lr", "train_loss", "test_top1", "test_balanced_acc", "val_top1", "seconds", "img_per_s"} <= set(lines[0])
    split = json.loads((run_dir / "split.json").read_text())
    assert split["class_counts"][0] == 58 and split["val_size"] == 20 and len(split["train_index_sha256"]) == 16
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["class_counts"] == split["class_counts"]
    assert not any(k.startswith("module.") for k in ckpt["model"]), "the unwrapped module is saved"
    # the latest link points at the newest run (the LA run came second)
    assert os.readlink(cwd / "runs" / "latest") == "cifar10-lt_rho10_la_s0"


def test_a_shortened_run_says_its_milestones_never_come(two_runs):
    _, ce, la = two_runs  # --epochs 2 with the recipe's milestones [160, 180]
    assert "note: optim.milestones [160, 180] are not before train.epochs=2" in la.stdout
    assert ce.stdout.count("note: optim.milestones") == 1, "said once, by rank 0"


def test_eval_defaults_to_latest_and_says_the_total_shift_on_an_la_run(two_runs, fake_root):
    cwd, _, _ = two_runs
    out = run([REPO / "eval.py", "--posthoc", "--tau", "1", "--data-root", fake_root], cwd)
    assert "cifar10-lt_rho10_la_s0" in out.stdout and "post-hoc tau=1 (total 2)" in out.stdout
    assert "post-hoc tau=1 on top shifts its logits by a total of 2 x log prior" in out.stdout and not out.stderr
    report = json.loads((cwd / "runs" / "cifar10-lt_rho10_la_s0" / "eval.json").read_text())
    assert report["test"]["posthoc"]["tau"] == 1.0 and report["test"]["posthoc"]["total_tau"] == 2.0
    assert report["loss_tau"] == 1.0 and len(report["test"]["raw"]["per_class"]) == 10
    # the sweep on an LA run is over an extra t on top of the loss's shift
    sweep = run([REPO / "eval.py", "--tau-sweep", "--data-root", fake_root], cwd).stdout
    assert "LA loss alone (total tau 1)" in sweep and "LA loss + post-hoc, total tau 1 + t, t chosen" in sweep


def test_no_eval_flag_is_silently_ignored(two_runs, fake_root):
    cwd, _, _ = two_runs
    run_dir = cwd / "runs" / "cifar10-lt_rho10_ce_s0"

    def evaluate(*flags):
        code, out, err = eval_in_process([run_dir, *flags, "--data-root", fake_root])
        assert code == 0, err
        return out
    assert "post-hoc tau=1.5" in evaluate("--tau", "1.5"), "--tau implies --posthoc"
    assert json.loads((run_dir / "eval.json").read_text())["test"]["posthoc"]["tau"] == 1.5
    assert "swept over 5 values (0..2)" in evaluate("--taus", "0:2:0.5"), "--taus implies --tau-sweep"
    assert "rule one-se" in evaluate("--tau-rule", "one-se"), "--tau-rule implies --tau-sweep"
    assert f"rule {tausweep.DEFAULT_RULE}:" in evaluate("--tau-sweep")  # the default rule, by name


def test_eval_matches_the_last_training_epoch(two_runs, fake_root):
    cwd, _, _ = two_runs
    run_dir = cwd / "runs" / "cifar10-lt_rho10_ce_s0"
    out = run([REPO / "eval.py", run_dir, "--data-root", fake_root], cwd)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["test"]["raw"]["top1"] == pytest.approx(last["test_top1"])
    assert report["val"]["raw"]["balanced_acc"] == pytest.approx(last["val_balanced_acc"])
    # both splits' accuracies carry their 95 % intervals, in eval.json and in the printed tables
    for split in ("test", "val"):
        m = report[split]["raw"]
        assert m["top1_ci95"][0] <= m["top1"] <= m["top1_ci95"][1] and m["top1_ci95"][0] < m["top1_ci95"][1]
        assert m["balanced_acc_ci95"][0] <= m["balanced_acc"] <= m["balanced_acc_ci95"][1]
    assert out.stdout.count("95 % interval") == 4 and "validation split (20 images" in out.stdout


@pytest.mark.skipif(hardware.cxx_compiler() is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_run_saves_the_plain_module_and_eval_reproduces_it(fake_root, tmp_path):
    """train.compile=true (the CPU default under 'auto'): the one compiled run of the suite, so it checks a lot."""
    out = tmp_path / "compiled"
    proc = run([REPO / "train.py", "--data-root", fake_root, "--epochs", "1", "--out", out] + TINY
               + ["--set", "train.compile=true", "--set", "optim.milestones=[0]"], tmp_path)
    assert "compile on," in proc.stdout
    assert "note: optim.milestones" not in proc.stdout  # its one milestone (x0.1 from epoch 0) lies inside the run
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert not any("_orig_mod" in k for k in ckpt["model"]), "the checkpoint holds the plain module, not the compiled wrapper"
    run([REPO / "eval.py", out, "--data-root", fake_root], tmp_path)  # evaluates uncompiled, at the same precision
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert json.loads((out / "eval.json").read_text())["test"]["raw"]["top1"] == pytest.approx(last["test_top1"])


def test_compile_auto_is_on_for_cpus_with_a_cxx_compiler_and_off_on_cuda(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("CXX", sys.executable)  # any executable will do for the lookup
    assert runtime.resolve_compile("auto", cpu) is True
    assert runtime.resolve_compile("auto", cuda) is False
    assert runtime.resolve_compile("true", cuda) is True and runtime.resolve_compile("false", cpu) is False
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert runtime.resolve_compile("auto", cpu) is False  # no compiler: train uncompiled rather than fail


def test_logits_are_cached_and_invalidated(two_runs, fake_root, tmp_path):
    cwd, _, _ = two_runs
    run_dir = tmp_path / "copy"
    shutil.copytree(cwd / "runs" / "cifar10-lt_rho10_ce_s0", run_dir)
    data = tmp_path / "data"
    shutil.copytree(fake_root, data)
    run([REPO / "eval.py", run_dir, "--data-root", data], cwd)
    assert (run_dir / "logits.pt").is_file()
    # cached: a second evaluation and a tau sweep of the same data need neither the model nor the data
    data.rename(tmp_path / "moved")
    sweep = run([REPO / "eval.py", run_dir, "--tau-sweep", "--data-root", data], cwd)
    assert "tau chosen on validation" in sweep.stdout and "ORACLE" in sweep.stdout
    # the cache is keyed on the data too: another --data-root computes the logits from it again
    code, _, err = eval_in_process([run_dir, "--data-root", tmp_path / "nowhere"])
    assert code != 0 and "not found" in err
    run([REPO / "eval.py", run_dir, "--tau-sweep", "--data-root", tmp_path / "moved"], cwd)
    assert torch.load(run_dir / "logits.pt", weights_only=True)["data_root"] == str(tmp_path / "moved")
    assert (run_dir / "tau_sweep.png").stat().st_size > 1000
    report = json.loads((run_dir / "eval.json").read_text())
    assert set(report["tau_sweep"]) >= {"paper_default", "validation_chosen", "oracle_test_tuned"}
    # a changed checkpoint invalidates the cache: now the data is needed again
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    ckpt["model"]["fc.bias"] += 1.0
    torch.save(ckpt, run_dir / "checkpoint.pt")
    code, _, err = eval_in_process([run_dir, "--data-root", tmp_path / "nowhere"])
    assert code != 0 and "not found" in err
    run([REPO / "eval.py", run_dir, "--data-root", fake_root], cwd)
    assert torch.load(run_dir / "logits.pt", weights_only=True)["splits"]["test"][0].shape == (100, 10)


def test_a_run_kept_without_its_checkpoint_is_evaluated_from_its_logits(two_runs, fake_root, tmp_path):
    """results/ keeps most runs as logits.pt alone: eval.py reports the same numbers from it, and says what is
    missing when it cannot."""
    cwd, _, _ = two_runs
    run_dir = tmp_path / "kept"
    shutil.copytree(cwd / "runs" / "cifar10-lt_rho10_ce_s0", run_dir)
    run([REPO / "eval.py", run_dir, "--posthoc", "--tau-sweep", "--data-root", fake_root], cwd)
    whole = json.loads((run_dir / "eval.json").read_text())
    (run_dir / "checkpoint.pt").unlink()
    # the logits are all there is: another --data-root cannot be honoured, and says so
    code, _, err = eval_in_process([run_dir, "--data-root", tmp_path / "nowhere"])
    assert code == 2 and err.strip().endswith(f"on --data-root {tmp_path / 'nowhere'}")
    before = (run_dir / "eval.json").read_bytes()
    out = run([REPO / "eval.py", run_dir, "--posthoc", "--tau-sweep"], cwd)
    assert "left unchanged" in out.stdout  # the same numbers: eval.json (and a committed copy of it) is not rewritten
    assert (run_dir / "eval.json").read_bytes() == before
    (run_dir / "eval.json").unlink()  # written afresh, from the logits alone
    run([REPO / "eval.py", run_dir, "--posthoc", "--tau-sweep"], cwd)
    alone = json.loads((run_dir / "eval.json").read_text())
    assert alone["checkpoint"] is None and alone["finished"] is True
    for key in ("test", "val", "tau_sweep", "checkpoint_sha256", "epoch"):
        assert alone[key] == whole[key], key
    cache = torch.load(run_dir / "logits.pt", weights_only=True)
    del cache["checkpoint_state"]  # a cache from before the state was kept: how far the run got is unknown
    torch.save(cache, run_dir / "logits.pt")
    code, _, err = eval_in_process([run_dir])
    assert code == 2 and err.strip().endswith("its logits.pt does not say how far the run got")


def test_an_unfinished_run_is_marked(two_runs, fake_root, tmp_path):
    cwd, _, _ = two_runs
    run_dir = tmp_path / "stopped"
    shutil.copytree(cwd / "runs" / "cifar10-lt_rho10_ce_s0", run_dir)
    finished = run([REPO / "eval.py", run_dir, "--data-root", fake_root], cwd)
    assert "UNFINISHED" not in finished.stdout
    report = json.loads((run_dir / "eval.json").read_text())
    assert (report["finished"], report["epoch"], report["step"], report["epochs"]) == (True, 2, 0, 2)
    # as a stop by signal leaves it: one epoch done, 3 steps into the second (train.py saves epoch, step so)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    ckpt["epoch"], ckpt["step"] = 1, 3
    torch.save(ckpt, run_dir / "checkpoint.pt")
    out = run([REPO / "eval.py", run_dir, "--data-root", fake_root, "--tau-sweep"], cwd).stdout
    assert "UNFINISHED RUN: stopped's checkpoint is at epoch 1, step 3 into epoch 2, of 2" in out
    assert out.index("UNFINISHED") < out.index("test set")  # said above the table
    report = json.loads((run_dir / "eval.json").read_text())
    assert (report["finished"], report["epoch"], report["step"], report["epochs"]) == (False, 1, 3, 2)
    # a cache written before the state (and the data root) was kept still evaluates, from the cache: the state
    # is read from the checkpoint
    cache = torch.load(run_dir / "logits.pt", weights_only=True)
    del cache["checkpoint_state"], cache["data_root"]
    torch.save(cache, run_dir / "logits.pt")
    again = run([REPO / "eval.py", run_dir], cwd).stdout
    assert "data_root" not in torch.load(run_dir / "logits.pt", weights_only=True)  # not computed again
    assert "epoch 1, step 3 into epoch 2, of 2" in again


def test_a_resume_writes_the_metrics_line_a_crash_during_evaluation_lost(two_runs, fake_root, tmp_path):
    """The checkpoint is saved before the evaluation; a kill during the last epoch's evaluation loses its metrics
    line, and the run would count as unfinished with nothing left to train. --resume evaluates it again."""
    cwd, _, la = two_runs
    run_dir = tmp_path / "la"
    shutil.copytree(cwd / "runs" / "cifar10-lt_rho10_la_s0", run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text(lines[0] + "\n")
    resume = [REPO / "train.py", "--data-root", fake_root, "--epochs", "2", "--loss", "la", "--out", run_dir,
              "--resume"] + TINY
    out = run(resume, cwd).stdout
    assert "epoch 2 has no metrics line (its evaluation did not finish): evaluating it now" in out
    again = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert again[0] == lines[0] and json.loads(again[1]).keys() == json.loads(lines[1]).keys()
    lost, redone = json.loads(lines[1]), json.loads(again[1])
    del lost["eval_seconds"], redone["eval_seconds"]
    assert redone == lost  # the training figures from the checkpoint, the evaluation of the same weights
    assert "no metrics line" not in run(resume, cwd).stdout  # a whole run: nothing to redo, nothing appended
    assert (run_dir / "metrics.jsonl").read_text().splitlines() == again


def test_per_class_chart_of_ce_and_la(two_runs, fake_root, tmp_path):
    cwd, _, _ = two_runs
    png = tmp_path / "per_class.png"
    out = run([REPO / "eval.py", cwd / "runs" / "cifar10-lt_rho10_ce_s0", cwd / "runs" / "cifar10-lt_rho10_la_s0",
               "--posthoc", "--plot", png, "--data-root", fake_root], cwd)
    assert png.stat().st_size > 5000 and "per-class chart" in out.stdout


def test_missing_data_is_one_line(tmp_path):
    proc = run([REPO / "train.py", "--data-root", tmp_path / "empty", "--set", "data.download=false", "--out", tmp_path / "r"],
               tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "cifar-10-batches-py" in proc.stderr and "Traceback" not in proc.stderr
