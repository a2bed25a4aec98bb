"""Tiny generated CIFAR in the real python-pickle layout, and helpers to run the entry points."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def repository_runs_untouched():
    """No test trains with the repository as its working directory: train.py points runs/latest under the working
    directory, so such a test would repoint a user's runs/latest (what plain `python eval.py` reads) at its
    temporary run. Tests pass cwd=tmp_path and the scripts' full paths."""
    latest = REPO / "runs" / "latest"
    target = lambda: os.readlink(latest) if latest.is_symlink() else None
    before = target()
    yield
    assert target() == before, f"a test repointed {latest} (at {target()}): run it with cwd=tmp_path"


# Pickle protocol of the generated files: 4, as CIFAR re-pickled by Python 3 (test_data.py tries 3 and 5 too).
PROTOCOL = 4


def write_fake_cifar(root, dataset="cifar10", per_class=60, test_per_class=10, seed=0):
    """Class-dependent noise images: learnable enough that a few steps beat chance."""
    rng = np.random.RandomState(seed)
    n_classes = 10 if dataset == "cifar10" else 100
    colors = rng.randint(0, 256, size=(n_classes, 3))

    def make(n_per_class):
        labels = rng.permutation(np.repeat(np.arange(n_classes), n_per_class))
        noise = rng.randint(-40, 41, size=(len(labels), 3, 32, 32))
        images = np.clip(colors[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)
        return images.reshape(len(labels), -1), labels.tolist()

    root = Path(root)
    if dataset == "cifar10":
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True, exist_ok=True)
        x, y = make(per_class)
        for i, part in enumerate(np.array_split(np.arange(len(y)), 5)):
            with open(base / f"data_batch_{i + 1}", "wb") as f:
                pickle.dump({"data": x[part], "labels": [y[j] for j in part]}, f, PROTOCOL)
        x, y = make(test_per_class)
        with open(base / "test_batch", "wb") as f:
            pickle.dump({"data": x, "labels": y}, f, PROTOCOL)
        with open(base / "batches.meta", "wb") as f:
            pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f, PROTOCOL)
    else:
        base = root / "cifar-100-python"
        base.mkdir(parents=True, exist_ok=True)
        for name, n in (("train", per_class), ("test", test_per_class)):
            x, y = make(n)
            with open(base / name, "wb") as f:
                pickle.dump({"data": x, "fine_labels": y, "coarse_labels": [v // 5 for v in y]}, f, PROTOCOL)
        with open(base / "meta", "wb") as f:
            pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f, PROTOCOL)
    return root


@pytest.fixture(scope="session")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, "cifar10", per_class=60, test_per_class=10)
    write_fake_cifar(root, "cifar100", per_class=12, test_per_class=2)
    return root


# A run small enough for a test: tiny data, tiny batches, ResNet-8 (ResNet-32's family with one block per stage:
# 12 M multiply-adds per image against 69 M), fp32 so results do not depend on bf16 support, and uncompiled
# (compiling takes most of a minute; tests/test_end_to_end.py has the one compiled run).
TINY = ["--set", "data.download=false", "--set", "data.val_per_class=2", "--set", "train.batch_size=32",
        "--set", "train.precision=fp32", "--set", "train.compile=false", "--set", "train.eval_batch_size=64",
        "--set", "model.name=resnet8", "--rho", "10"]
# The same run as the scripts' EXTRA (one string, split on spaces); they set rho themselves.
TINY_EXTRA = " ".join(TINY[:TINY.index("--rho")])


def run(args, cwd, check=True, env=None, timeout=300, **kw):
    """Run a command with the repository on PYTHONPATH and no LA_DATA_ROOT leaking in."""
    full_env = {k: v for k, v in os.environ.items() if k != "LA_DATA_ROOT"}
    full_env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, **(env or {}))
    cmd = [sys.executable] + [str(a) for a in args] if str(args[0]).endswith(".py") else [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def eval_in_process(argv):
    """(exit status, stdout, stderr) of eval.py run as its command line runs it (run_cli), in this process: for
    tests of its flags and errors, without the two seconds of a new interpreter importing torch. As run() does, it
    keeps LA_DATA_ROOT out."""
    import contextlib
    import importlib.util
    import io

    import la

    spec = importlib.util.spec_from_file_location("eval_script", REPO / "eval.py")
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    out, err, argv0, data_root = io.StringIO(), io.StringIO(), sys.argv, os.environ.pop("LA_DATA_ROOT", None)
    sys.argv = [str(REPO / "eval.py"), *map(str, argv)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
            la.run_cli(ev.main)
    finally:
        sys.argv = argv0
        if data_root is not None:
            os.environ["LA_DATA_ROOT"] = data_root
    return e.value.code, out.getvalue(), err.getvalue()


class Payload:
    """What a planted pickle carries: loading it calls open(path, "w"), which creates path, as a planted os.system
    would run a command (without the shell). A test that plants one checks that the file never appears."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")
