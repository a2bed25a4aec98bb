"""scripts/tau_rules.py: resampled validation splits scored on the undrawn test images, the rule picked on one half."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from conftest import REPO
from la import losses, tausweep

spec = importlib.util.spec_from_file_location("tau_rules", REPO / "scripts" / "tau_rules.py")
tau_rules = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tau_rules)


def fake_run(path, seed, loss="ce", per_class_test=30, val_per_class=5, counts=(300, 60, 12), epoch=3):
    """Cached logits of a made-up head-biased model: class scores plus noise plus a pull towards the prior."""
    g = torch.Generator().manual_seed(seed)
    lp = losses.log_prior(list(counts))

    def split(n):
        y = torch.arange(len(counts)).repeat_interleave(n)
        logits = 2.0 * torch.nn.functional.one_hot(y, len(counts)) + torch.randn(len(y), len(counts), generator=g) + lp
        return logits - (lp if loss == "la" else 0), y

    path.mkdir(parents=True)
    torch.save({"config": {"loss": {"name": loss, "tau": 1.0}, "data": {"val_per_class": val_per_class}},
                "class_counts": list(counts), "splits": {"val": split(val_per_class), "test": split(per_class_test)},
                "checkpoint_state": {"finished": epoch == 3, "epoch": epoch, "step": 0, "epochs": 3}},
               path / "logits.pt")
    return path


def test_a_resampled_draw_is_scored_on_the_undrawn_images_only(tmp_path):
    run = tau_rules.Run(fake_run(tmp_path / "a", 0))
    scores = tau_rules.resampled(run, 5, 1, np.random.RandomState(7))
    # the same draw by hand: choose on the drawn images, score on the others
    rng, labels = np.random.RandomState(7), run.test[1].numpy()
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), 5, replace=False) for c in range(3)])
    rest = np.setdiff1d(np.arange(len(labels)), idx)
    for rule in tausweep.RULES:
        hit, nll = tausweep.per_tau(run.test[0][idx], run.test[1][idx], run.log_pi, run.taus)
        tau = tausweep.choose(rule, run.taus, hit, nll, run.test[1][idx], 3, 1.0)
        acc = tausweep.per_tau(run.test[0][rest], run.test[1][rest], run.log_pi, [tau])[0]
        assert scores[rule][0] == pytest.approx(100 * float(tausweep.balanced(acc.double(), run.test[1][rest], 3)[0]))


def test_the_rule_is_picked_on_the_choose_half_alone():
    results = {n: {"resampled": {20: {r: (score, 0.1, score - 1) for r, score in zip(tausweep.RULES, scores)}}}
               for n, scores in (("a", (80, 81, 79)), ("b", (80, 82, 79)), ("c", (90, 70, 70)))}
    rule, means = tau_rules.pick(results, ["a", "b"], 20)
    assert rule == list(tausweep.RULES)[1] and means[rule] == 81.5  # c, where another rule wins, is not looked at


def test_script_end_to_end(tmp_path):
    runs = [fake_run(tmp_path / f"r{i}", i, "la" if i == 3 else "ce") for i in range(4)]
    runs.append(fake_run(tmp_path / "stopped", 4, epoch=1))
    out = tmp_path / "out" / "tau_rules"
    argv = ["--choose", str(runs[0]), str(runs[3]), "--report", str(runs[1]), str(runs[2]), str(runs[4]),
            "--draws", "3", "--sizes", "5", "10", "--out", str(out)]
    tau_rules.main(argv)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["chosen"] in tausweep.RULES and report["halves"]["report"] == [str(runs[1]), str(runs[2])]
    assert report["runs"][str(runs[3])]["own"]["default"][0] == 0.0  # on the LA run the default is no extra shift
    md = out.with_suffix(".md").read_text()
    assert md.count("| choose |") == 2 + 4 and md.count("| report |") == 2 + 4  # runs, then default and 3 rules
    assert "Left out, not finished" in md and "stopped (UNFINISHED: epoch 1 of 3)" in md  # an unfinished run
    tau_rules.main(argv + ["--include-unfinished"])
    md = out.with_suffix(".md").read_text()
    assert md.count("| report |") == 3 + 4 and "| report | " + str(runs[4]) + " (UNFINISHED: epoch 1 of 3) |" in md



def test_the_default_rule_is_the_one_measured():
    """eval.py --tau-sweep's default is the rule results/tau_rules.json chose; change both or neither."""
    assert json.loads((REPO / "results" / "tau_rules.json").read_text())["chosen"] == tausweep.DEFAULT_RULE
