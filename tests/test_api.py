"""Issue 37: logit adjustment for any model. The public API (from la import ...), eval.py --logits on any model's
logits and --export-logits, and the package installed into a fresh virtual environment from a fresh clone."""
import ast
import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import la
from la import (LogitAdjustedLoss, balanced_accuracy, balanced_ci95, choose_tau, log_prior, logit_adjusted_ce,
                losses, posthoc_adjust)
from conftest import REPO, eval_in_process, run

EVAL = REPO / "eval.py"
COUNTS = [int(1000 * 100 ** (-i / 9)) for i in range(10)]  # CIFAR-10-LT's shape, rho = 100
TAU_TRUE = 1.5  # not the default 1, which ties would pick


def shifted_logits(n_per_class, tau_true, seed, noise=0.2):
    """Balanced-posterior logits plus tau_true * log pi plus noise, for n_per_class images of each class: x is a
    Gaussian around its class's corner, so 1.5 x is the log of its balanced posterior up to a constant."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(len(COUNTS)).repeat_interleave(n_per_class)
    x = 1.5 * F.one_hot(y, len(COUNTS)).double() + torch.randn(len(y), len(COUNTS), generator=g, dtype=torch.float64)
    extra = noise * torch.randn(len(y), len(COUNTS), generator=g, dtype=torch.float64)
    return (1.5 * x + tau_true * log_prior(COUNTS).double() + extra).float(), y


def test_the_api_is_documented_and_import_la_stays_light():
    for name in la.API:
        assert getattr(la, name).__doc__, name
    with pytest.raises(AttributeError):
        la.no_such_name
    out = subprocess.run([sys.executable, "-c", "import sys, la; print('torch' in sys.modules)"], cwd=REPO.parent,
                         env={"PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_logit_adjusted_loss_is_cross_entropy_on_shifted_logits():
    logits, targets = torch.randn(8, 10, requires_grad=True), torch.randint(0, 10, (8,))
    log_pi = log_prior(COUNTS)
    assert torch.allclose(log_pi.exp().sum(), torch.tensor(1.0)) and log_pi.argmax() == 0
    expected = F.cross_entropy(logits + 2.0 * log_pi, targets)
    assert torch.allclose(logit_adjusted_ce(logits, targets, log_pi, tau=2.0), expected)
    criterion = LogitAdjustedLoss(COUNTS, tau=2.0)
    assert isinstance(criterion, torch.nn.Module) and "log_pi" in dict(criterion.named_buffers())
    loss = criterion(logits, targets)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert torch.allclose(LogitAdjustedLoss(COUNTS, tau=0.0)(logits, targets), F.cross_entropy(logits, targets))
    # train.py's criterion is the same function
    assert torch.allclose(losses.Criterion("la", COUNTS, 2.0)(logits, targets), expected)


def test_posthoc_adjust_and_balanced_accuracy_take_numpy_too():
    logits, labels = np.random.RandomState(0).randn(50, 10).astype(np.float32), np.arange(50) % 10
    adjusted = posthoc_adjust(logits, log_prior(COUNTS).numpy(), 0.5)
    assert torch.allclose(adjusted, torch.from_numpy(logits) - 0.5 * log_prior(COUNTS))
    acc, ci = balanced_accuracy(logits, labels)
    hits = logits.argmax(1) == labels
    assert acc == pytest.approx(100 * np.mean([hits[labels == c].mean() for c in range(10)]))
    assert ci == balanced_ci95([hits[labels == c].sum() for c in range(10)], [5] * 10) and ci[0] < acc < ci[1]


def test_choose_tau_finds_a_known_prior_shift_and_adjustment_beats_raw():
    val, test = shifted_logits(200, TAU_TRUE, seed=0), shifted_logits(300, TAU_TRUE, seed=1)
    tau, sweep = choose_tau(*val, log_prior(COUNTS))
    assert tau == pytest.approx(TAU_TRUE, abs=0.2)
    assert sweep["taus"][0] == 0 and sweep["taus"][-1] == 3 and 1.0 in sweep["taus"]
    assert len(sweep["val_balanced_acc"]) == len(sweep["val_balanced_nll"]) == len(sweep["taus"])
    assert min(sweep["val_balanced_nll"]) == sweep["val_balanced_nll"][sweep["taus"].index(tau)]
    raw, adjusted = balanced_accuracy(*test)[0], balanced_accuracy(posthoc_adjust(test[0], log_prior(COUNTS), tau), test[1])[0]
    assert adjusted > raw + 10
    assert choose_tau(*val, log_prior(COUNTS), rule="val-acc", taus=[0, 0.5, 1, 1.5, 2])[0] in (1, 1.5, 2)


def write_npz(path, val=True, **override):
    """A logits file of the generated shift; override replaces (or, with None, removes) its arrays."""
    (tv, yv), (tt, yt) = shifted_logits(100, TAU_TRUE, seed=0), shifted_logits(100, TAU_TRUE, seed=1)
    arrays = {"test_logits": tt.numpy(), "test_labels": yt.numpy(), "train_counts": np.array(COUNTS)}
    if val:
        arrays.update(val_logits=tv.numpy(), val_labels=yv.numpy())
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def row(stdout, name):
    """The numbers of a table row of eval.py's output, by its name."""
    line = next(line for line in stdout.splitlines() if line.startswith(name))
    return line[len(name):].split()


def test_eval_logits_prints_the_apis_numbers(tmp_path):
    path = write_npz(tmp_path / "model.npz")
    out = run([EVAL, "--logits", path, "--json", tmp_path / "r.json", "--plot", tmp_path / "pc.png"], cwd=tmp_path).stdout
    (val, val_y), (test, test_y) = shifted_logits(100, TAU_TRUE, seed=0), shifted_logits(100, TAU_TRUE, seed=1)
    log_pi = log_prior(COUNTS)
    tau, _ = choose_tau(val, val_y, log_pi)
    raw, at_1 = balanced_accuracy(test, test_y), balanced_accuracy(posthoc_adjust(test, log_pi, 1.0), test_y)
    assert row(out, "balanced acc")[:2] == [f"{raw[0]:.2f}", f"{at_1[0]:.2f}"]
    assert row(out, "  95 % interval")[:2] == [f"{raw[1][0]:.2f}-{raw[1][1]:.2f}", f"{at_1[1][0]:.2f}-{at_1[1][1]:.2f}"]
    chosen = out.split("chosen on validation by rule val-nll (the fair result)\n")[1].splitlines()[0]
    acc, ci = balanced_accuracy(posthoc_adjust(test, log_pi, tau), test_y)
    assert f"tau={tau:<5g}" in chosen and f"test balanced {acc:.2f} ({ci[0]:.2f}-{ci[1]:.2f})" in chosen
    assert "ORACLE" in out and "many-shot" in out and "NLL" in out and "ECE" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tau_sweep"]["validation_chosen"]["tau"] == tau and report["test"]["raw"]["balanced_acc"] == raw[0]
    assert (tmp_path / "pc.png").stat().st_size > 0 and (tmp_path / "pc.tau_sweep.png").stat().st_size > 0
    # the same arrays in a .pt file give the same report
    torch.save({k: torch.from_numpy(v) for k, v in np.load(path).items()}, tmp_path / "model.pt")
    code, out_pt, _ = eval_in_process(["--logits", str(tmp_path / "model.pt")])
    assert code == 0 and out_pt.replace("model.pt", "model.npz").splitlines() == \
        [line for line in out.splitlines() if not line.startswith(("plot:", "per-class chart:"))]


def test_eval_logits_without_validation_shows_tau_1_and_the_oracle_only(tmp_path):
    code, out, _ = eval_in_process(["--logits", str(write_npz(tmp_path / "m.npz", val=False))])
    assert code == 0
    assert "holds no val_logits, so no tau is chosen on validation" in out
    assert "tau = 1 (paper default)" in out and "ORACLE" in out and "the fair result" not in out
    assert "validation split (" not in out and "val balanced" not in out


BAD = {
    "missing key": (dict(train_counts=None), "lacks train_counts"),
    "half of validation": (dict(val_labels=None), "lacks val_labels"),
    "lengths": (dict(test_labels=np.zeros(999, dtype=np.int64)), "has 1000 rows but test_labels has 999 labels"),
    "label outside": (dict(val_labels=np.full(1000, 10)), "val_labels holds 10 (at 0), outside 0..9"),
    "negative label": (dict(test_labels=np.r_[np.zeros(999, dtype=np.int64), -1]), "holds -1 (at 999), outside 0..9"),
    "nan": (dict(test_logits=np.where(np.eye(1000, 10) > 0, np.nan, 0).astype(np.float32)), "NaN or infinite values in 10 rows"),
    "inf": (dict(val_logits=np.r_[np.zeros((999, 10)), np.full((1, 10), np.inf)].astype(np.float32)), "first: row 999"),
    "zero count": (dict(train_counts=np.array(COUNTS[:7] + [0, 5, 0])), "train_counts is 0 for classes 7, 9"),
    "val and test C": (dict(val_logits=np.zeros((1000, 9), np.float32)), "val_logits has 9 classes (columns) but test_logits has 10"),
    "counts and C": (dict(train_counts=np.array(COUNTS[:9])), "test_logits has 10 classes (columns) but train_counts has 9"),
    "float labels": (dict(test_labels=np.zeros(1000)), "test_labels must be a 1-D array of integers"),
}


def test_each_bad_logits_file_is_one_line(tmp_path):
    """In this process, through run_cli as the command line goes (a subprocess per case would take a minute);
    the first case also as a real command line."""
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "junk.npz").write_text("not a zip")
    cases = [([write_npz(tmp_path / f"bad{i}.npz", **override)], message) for i, (override, message) in enumerate(BAD.values())]
    cases += [([tmp_path / "absent.npz"], "no such file"), ([tmp_path / "notes.txt"], "a .npz or .pt file"),
              ([tmp_path / "junk.npz"], "could not be read"), ([tmp_path / "junk.npz", "--wnorm-tau", "1"], "drop --wnorm")]
    for args, message in cases:
        code, out, err = eval_in_process(["--logits", *map(str, args)])
        assert code != 0 and not out and err.count("\n") == 1 and err.startswith("error: --logits "), (message, err)
        assert message in err, (message, err)
    proc = run([EVAL, "--logits", tmp_path / "bad0.npz"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --logits") and proc.stderr.count("\n") == 1


COMMITTED = REPO / "results" / "paper_cifar10" / "cifar10-lt_rho100_ce_s0"


@pytest.mark.skipif(not (COMMITTED / "logits.pt").is_file(), reason="the committed run's logits are not here")
def test_export_then_logits_gives_the_runs_own_numbers(tmp_path):
    run_dir = shutil.copytree(COMMITTED, tmp_path / COMMITTED.name)
    (run_dir / "eval.json").unlink()  # else eval.py keeps the committed report, whose ECE differs at 1e-8
    run([EVAL, run_dir, "--posthoc", "--tau-sweep"], cwd=tmp_path)
    for name in ("e.npz", "e.pt"):
        code, out, _ = eval_in_process([str(run_dir), "--export-logits", str(tmp_path / name)])
        assert code == 0 and "val 200 images, test 10000 images" in out
        assert eval_in_process(["--logits", str(tmp_path / name), "--json", str(tmp_path / f"{name}.json")])[0] == 0
    own, committed = json.loads((run_dir / "eval.json").read_text()), json.loads((COMMITTED / "eval.json").read_text())
    for name in ("e.npz", "e.pt"):
        exported = json.loads((tmp_path / f"{name}.json").read_text())
        for split in ("val", "test"):
            for kind in ("raw", "posthoc"):
                assert exported[split][kind] == own[split][kind], (name, split, kind)
        assert exported["tau_sweep"] == own["tau_sweep"] and exported["class_counts"] == committed["class_counts"]
    # and the numbers committed with the run (computed on another machine: NLL and ECE to float precision)
    for kind in ("raw", "posthoc"):
        for key in ("balanced_acc", "top1", "many", "medium", "per_class"):
            assert exported["test"][kind][key] == committed["test"][kind][key], (kind, key)
        assert exported["test"][kind]["ece"] == pytest.approx(committed["test"][kind]["ece"], rel=1e-6)
    for key in ("paper_default", "validation_chosen", "oracle_test_tuned"):
        assert exported["tau_sweep"][key]["tau"] == committed["tau_sweep"][key]["tau"]
        assert exported["tau_sweep"][key]["test_balanced_acc"] == committed["tau_sweep"][key]["test_balanced_acc"]


def test_the_package_installs_into_a_fresh_venv_from_a_fresh_clone(tmp_path):
    """Offline where this environment's setuptools can build a wheel itself (70.1 and later); else pip fetches the
    build backend from PyPI. The new environment sees this one's packages (torch) through a .pth file."""
    if subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    clone, venv = tmp_path / "clone", tmp_path / "venv"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "outer.pth").write_text("\n".join(paths) + "\n")
    offline = ["--no-build-isolation", "--no-index"] if builds_wheels_offline() else []
    run([python, "-m", "pip", "install", "-q", "--no-deps", *offline, clone], cwd=tmp_path, env={"PYTHONPATH": ""})
    check = ("import la, importlib.metadata as m; from la import choose_tau, log_prior, posthoc_adjust, "
             "balanced_accuracy, LogitAdjustedLoss, logit_adjusted_ce; import torch; "
             "print(la.__file__); print(m.requires('logit-adjustment')); "
             "print(LogitAdjustedLoss([9, 1])(torch.zeros(1, 2), torch.tensor([1])).item())")
    out = run([python, "-c", check], cwd=tmp_path, env={"PYTHONPATH": ""}).stdout.splitlines()
    assert out[0].startswith(site) and not out[0].startswith(str(REPO))
    required = [re.split(r"[<>=!~;\[ ]", r)[0] for r in ast.literal_eval(out[1])]
    listed = [re.split(r"[<>=!~;\[ ]", line)[0] for line in (REPO / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert sorted(required) == sorted(listed)
    assert float(out[2]) == pytest.approx(-np.log(0.1), rel=1e-5)  # zero logits + log prior: the prior itself


def builds_wheels_offline():
    """Whether this environment's setuptools builds a wheel without fetching anything (bdist_wheel built in)."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(v) for v in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1)


def test_readmes_snippet_runs_on_any_models_logits(capsys):
    text = (REPO / "README.md").read_text().split("## Post-hoc adjustment of a model you already have")[1]
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    (val_logits, val_labels), (test_logits, test_labels) = shifted_logits(50, TAU_TRUE, 0), shifted_logits(50, TAU_TRUE, 1)
    exec(snippet, {"train_counts": COUNTS, "val_logits": val_logits.numpy(), "val_labels": val_labels.numpy(),
                   "test_logits": test_logits.numpy(), "test_labels": test_labels.numpy()})
    assert re.fullmatch(r"tau [\d.]+: balanced accuracy [\d.]+ % \(95 % interval [\d.]+-[\d.]+\)\n", capsys.readouterr().out)
