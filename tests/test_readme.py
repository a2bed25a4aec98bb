"""README's two commands: the first shows the method without counting the prior twice, the second is what CI runs."""
import importlib.util
import re
import shlex

from conftest import REPO


def load(script):
    spec = importlib.util.spec_from_file_location(script, REPO / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def two_commands():
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Two commands\n+```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_the_first_command_trains_and_evaluates_without_double_counting():
    first, _ = two_commands()
    steps = {shlex.split(part)[1]: shlex.split(part)[2:] for part in first.split("&&") if part.strip().startswith("python ")}
    train_args, eval_args = load("train").parse_args(steps["train.py"]), load("eval").parse_args(steps["eval.py"])
    assert train_args.loss in ("ce", "la")
    if train_args.loss == "la":  # the LA loss's logits are already adjusted: evaluate them raw
        assert not eval_args.posthoc and not eval_args.tau_sweep, first
    else:  # a CE model shows the method only after post-hoc adjustment
        assert eval_args.posthoc or eval_args.tau_sweep, first


def test_the_second_command_is_what_ci_runs():
    _, second = two_commands()
    assert second == "python -m pytest -q"
    assert second in (REPO / ".ci" / "run").read_text()
