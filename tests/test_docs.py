"""What a user reads: no internal vocabulary, and README's quick check runs and leaves the checkout as it was."""
import ast
import hashlib
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

# Words that only mean something to whoever wrote a document: machine letters, tickets, work periods, the GPU list.
INTERNAL = re.compile(r"\bmachines? [A-E]\b|\bmachines [A-E](?:, [A-E])* and [A-E]\b|\bissues? ?-?\d+|\bjobs? \d+"
                      r"|\bjobs? of\b|\bqueue\b|\bround\b|\bsessions?\b", re.I)
# A commit hash in prose: 7 to 40 hex digits with at least one digit and one letter, outside code.
HASH = re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
GENERATED = re.compile(r"<!-- table3 provenance -->.*?<!-- /table3 -->", re.S)
CODE = re.compile(r"```.*?```|`[^`]*`", re.S)


def user_documents():
    return [REPO / "README.md", REPO / "RESULTS.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]


def help_texts(path):
    """A script's module docstring and the help, description and epilog strings its argument parser shows."""
    tree = ast.parse(path.read_text())
    texts = [ast.get_docstring(tree) or ""]
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in ("help", "description", "epilog"):
            texts += [n.value for n in ast.walk(node.value) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return "\n".join(texts)


def shell_header(path):
    """The comment block at the top of a shell script: what `head` shows a user."""
    lines = path.read_text().splitlines()[1:]
    return "\n".join(line for line in lines[:next((i for i, l in enumerate(lines) if not l.startswith("#")), 0)])


def user_texts():
    texts = {p.relative_to(REPO).as_posix(): p.read_text() for p in user_documents()}
    for script in [REPO / "train.py", REPO / "eval.py", *sorted((REPO / "scripts").glob("*.py"))]:
        texts[script.relative_to(REPO).as_posix()] = help_texts(script)
    for script in sorted((REPO / "scripts").glob("*.sh")):
        texts[script.relative_to(REPO).as_posix()] = shell_header(script)
    return texts


def offences(text):
    prose = CODE.sub("", GENERATED.sub("", text))
    lines = prose.splitlines()
    found = [f"{m.group(0)!r} in: {line.strip()[:100]}" for line in text.splitlines() for m in INTERNAL.finditer(line)]
    return found + [f"commit {m.group(0)} in: {line.strip()[:100]}" for line in lines for m in HASH.finditer(line)]


@pytest.mark.parametrize("name", sorted(user_texts()))
def test_no_internal_vocabulary_where_users_read(name):
    assert not offences(user_texts()[name]), "\n".join([name] + offences(user_texts()[name]))


def test_the_vocabulary_check_can_fail():
    for bad in ("measured on machine E", "in the seeds round", "job 10 of the GPU queue", "see issue 23",
                "at commit 5ef7d6e on a CPU", "in the third session"):
        assert offences(bad), bad
    assert not offences("`git show a55ce7d:results/x` <!-- table3 provenance -->\n| 5ef7d6e |\n<!-- /table3 -->")


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 165  # "at most about 150", with the generated table


def quick_check():
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Quick check.*?```bash\n(.*?)```", text, re.S).group(1)
    (command,) = [line for line in block.splitlines() if line.strip()]
    return shlex.split(command)


def tree_state(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_readme_quick_check_runs_and_changes_no_file(tmp_path):
    """The quick check prints the tau sweep from a committed run's cached logits and writes nothing into it."""
    argv = quick_check()
    assert argv[:2] == ["python", "eval.py"] and "--tau-sweep" in argv, argv
    run = REPO / argv[2]
    before = tree_state(run)
    git = subprocess.run(["git", "status", "--porcelain", "--", str(run)], cwd=REPO, capture_output=True, text=True)
    in_git = git.returncode == 0
    out = subprocess.run([sys.executable, str(REPO / "eval.py"), str(run), *argv[3:]], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "tau chosen on validation" in out.stdout and "left unchanged" in out.stdout, out.stdout
    assert tree_state(run) == before
    if in_git:
        after = subprocess.run(["git", "status", "--porcelain", "--", str(run)], cwd=REPO, capture_output=True,
                               text=True)
        assert after.stdout == git.stdout
    for line in re.search(r"After the test and validation tables it prints:\n+```\n(.*?)```",
                          (REPO / "README.md").read_text(), re.S).group(1).splitlines():
        if line.strip().startswith("tau="):
            assert line in out.stdout, f"README's expected output is stale: {line}"
