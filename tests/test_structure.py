"""The shape issue 16 gave the code, kept: train.py reads top to bottom in under 150 lines, and every function in
the repository is short enough to see whole (60 lines at most)."""
import ast
import os
import subprocess
import sys

import pytest

from conftest import REPO


def python_files():
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "*.py"], capture_output=True, text=True)
    if out.returncode:
        pytest.skip("not a git checkout")
    return [REPO / f for f in out.stdout.split()]


def test_train_py_reads_in_under_150_lines():
    assert len((REPO / "train.py").read_text().splitlines()) < 150


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def _la_imports(path, package):
    """The la modules a file imports: 'from la.x import y' is la.x, or la.x.y when that is a module; 'from la import
    y' is la, or la.y when that is a module; a relative import is resolved against package."""
    found = set()
    is_module = lambda name: (REPO / (name.replace(".", "/") + ".py")).is_file() or \
        (REPO / name.replace(".", "/") / "__init__.py").is_file()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "la"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "la":
                continue
            for a in node.names:
                found.add(f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base)
    return found


def test_la_imports_run_one_way_and_the_data_path_is_one_package(tmp_path):
    """Issue 38: la/data.py and la/folder.py imported each other. Now the data path is one package, la/data/, and
    no la module imports one that imports it back, directly or through others (imports inside functions count; a
    module importing a package imports its __init__, which for la.data imports its submodules). Each of the
    package's modules imports with no la module loaded before it."""
    modules = {}
    for path in sorted((REPO / "la").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        modules[name] = _la_imports(path, package) - {name}
    assert {"la.data", "la.data.cifar", "la.data.folder"} <= modules.keys()
    assert "la.folder" not in modules
    state = {}

    def visit(m, trail):
        if state.get(m) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(trail + [m])}")
        if state.get(m) != "done":
            state[m] = "open"
            for n in sorted(modules.get(m, ())):
                visit(n, trail + [m])
            state[m] = "done"
    for m in modules:
        visit(m, [])
    # one interpreter (torch imported once), forgetting every la module before each import
    alone = "import importlib, sys\nfor m in sys.argv[1:]:\n" \
            "    for k in [k for k in sys.modules if k == 'la' or k.startswith('la.')]: del sys.modules[k]\n" \
            "    print(m, flush=True); importlib.import_module(m)"
    data_modules = [m for m in modules if m.startswith("la.data")]
    out = subprocess.run([sys.executable, "-c", alone, *data_modules], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, f"import {out.stdout.split()[-1]} alone: {out.stderr}"
    assert out.stdout.split() == data_modules


def test_train_and_eval_start_without_torchvision():
    """Importing torchvision (and the torch._dynamo its ops pull in) added about two seconds to the start of every
    eval.py process on the CPUs here, and the test suite starts many. Only what needs torchvision imports it:
    ResNet-34/50, CIFAR's download, image-file datasets. (train.py's optimizer imports torch._dynamo itself, later.)"""
    code = "import sys, train, eval; print(sorted(m for m in ('torchvision', 'torch._dynamo', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
