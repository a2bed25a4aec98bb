import math

import pytest
import torch
import torch.nn.functional as F

from la import losses, metrics, tausweep


def test_log_prior_is_the_training_frequency():
    lp = losses.log_prior([300, 100])
    assert torch.allclose(lp, torch.tensor([math.log(0.75), math.log(0.25)]))


def test_la_loss_with_tau_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    lp = losses.log_prior([50, 20, 10, 5, 1])
    assert torch.allclose(losses.logit_adjusted_ce(logits, y, lp, 0.0), F.cross_entropy(logits, y))
    assert torch.allclose(losses.Criterion("ce", [50, 20, 10, 5, 1], 1.0)(logits, y), F.cross_entropy(logits, y))


def test_la_loss_is_cross_entropy_on_shifted_logits_by_hand():
    # two classes, prior (0.8, 0.2), logits (0, 0), label 1, tau 1:
    # shifted logits (log .8, log .2) -> loss = -log(.2 / (.8 + .2)) = -log .2
    lp = losses.log_prior([8, 2])
    loss = losses.logit_adjusted_ce(torch.zeros(1, 2), torch.tensor([1]), lp, 1.0)
    assert loss.item() == pytest.approx(-math.log(0.2), rel=1e-6)
    loss2 = losses.Criterion("la", [8, 2], 2.0)(torch.zeros(1, 2), torch.tensor([1]))
    assert loss2.item() == pytest.approx(-math.log(0.04 / (0.64 + 0.04)), rel=1e-6)  # tau=2 squares the prior


def test_posthoc_adjustment_flips_a_close_call_to_the_tail():
    lp = losses.log_prior([90, 10])
    logits = torch.tensor([[2.0, 0.5], [3.0, 0.0]])
    adjusted = losses.posthoc_adjust(logits, lp, 1.0)  # subtract log .9 / log .1: +0.105 / +2.303
    assert adjusted.argmax(1).tolist() == [1, 0]
    assert losses.posthoc_adjust(logits, lp, 0.0).argmax(1).tolist() == [0, 0]


def one_hot_logits(preds, n_classes, scale=10.0):
    return F.one_hot(torch.tensor(preds), n_classes).float() * scale


def test_balanced_accuracy_and_shot_groups_by_hand():
    # 3 classes: 4 test images of class 0 (3 right), 2 of class 1 (1 right), 2 of class 2 (0 right)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    preds = [0, 0, 0, 1, 1, 0, 0, 1]
    m = metrics.evaluate_logits(one_hot_logits(preds, 3), labels, train_counts=[500, 50, 5])
    assert m["top1"] == pytest.approx(100 * 4 / 8)
    assert m["balanced_acc"] == pytest.approx(100 * (0.75 + 0.5 + 0.0) / 3)
    assert m["per_class"] == [75.0, 50.0, 0.0]
    assert (m["many"], m["medium"], m["few"]) == (75.0, 50.0, 0.0)
    m2 = metrics.evaluate_logits(one_hot_logits(preds, 3), labels, train_counts=[500, 400, 300])
    assert m2["many"] == pytest.approx(100 * 1.25 / 3) and m2["medium"] is None and m2["few"] is None


def test_intervals_by_hand():
    # Wilson 95 % for 7 of 10 (textbook value 0.3968-0.8922); a normal interval would give 0.416-0.984
    assert metrics.wilson_ci95(7, 10) == pytest.approx([39.68, 89.22], abs=0.01)
    lo, hi = metrics.wilson_ci95(0, 20)
    assert lo == 0.0 and hi == pytest.approx(16.11, abs=0.01)  # nothing right still leaves room above 0
    # balanced accuracy of classes (3/4, 1/2, 0/2): var = sum_c p~ (1 - p~) / n~ / 3^2, each class with z^2 / 2
    # images added right and wrong (Agresti-Coull): p~ = (k + z^2 / 2) / (n + z^2)
    z2 = 1.959964 ** 2
    adjusted = lambda k, n: (k + z2 / 2) * (n - k + z2 / 2) / (n + z2) ** 3
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    m = metrics.evaluate_logits(one_hot_logits([0, 0, 0, 1, 1, 0, 0, 1], 3), labels, [500, 50, 5])
    half = 1.959964 * math.sqrt(adjusted(3, 4) + adjusted(1, 2) + adjusted(0, 2)) / 3
    assert m["balanced_acc_ci95"] == pytest.approx([100 * (5 / 12 - half), 100 * (5 / 12 + half)])
    assert m["top1_ci95"] == pytest.approx(metrics.wilson_ci95(4, 8)) and m["images"] == 8
    # a class with no test image is not a class of the balanced mean, nor of its variance; the top is clipped at 100
    m = metrics.evaluate_logits(one_hot_logits([0, 0, 0, 1], 3), labels[:4], [500, 50, 5])
    half = 1.959964 * math.sqrt(adjusted(3, 4))
    assert m["balanced_acc_ci95"] == pytest.approx([100 * (0.75 - half), 100.0])


def test_the_balanced_interval_keeps_its_width_when_every_class_is_at_0_or_100_percent():
    # 10 of 10 and 0 of 10: 50 %, and not [50, 50]; each class as if about 12 of 14 (and 2 of 14) had been seen
    lo, hi = metrics.balanced_ci95([10, 0], [10, 10])
    assert lo == pytest.approx(37.12, abs=0.01) and hi == pytest.approx(62.88, abs=0.01)
    lo, hi = metrics.balanced_ci95([20, 20, 20], [20, 20, 20])  # all right: still room below 100
    assert hi == 100.0 and 90 < lo < 99
    assert metrics.balanced_ci95([0], [20])[1] > 10  # nothing right still leaves room above 0
    # many images per class: as the plain binomial interval, to a hundredth of a point
    plain = 1.959964 * math.sqrt(10 * 0.77 * 0.23 / 1000) / 10
    assert metrics.balanced_ci95([770] * 10, [1000] * 10) == pytest.approx([100 * (0.77 - plain), 100 * (0.77 + plain)],
                                                                          abs=0.01)
    # the paired standard error of a gain, the same way: a class where both classifiers agree on every image
    # still counts, so a gain on one image of a 2-image class is not certain
    hit_a, hit_b = torch.tensor([True, True, True, False]), torch.tensor([True, True, False, False])
    se = tausweep.gain_se(hit_a, hit_b, torch.tensor([0, 0, 1, 1]), 2)
    assert se == pytest.approx(math.sqrt((1 - 0) / 16 + (2 - 1 / 4) / 16) / 2)


def test_nll_and_ece_by_hand():
    # two images, both predicted class 0 with confidence p; one right, one wrong
    p = 0.8
    logits = torch.log(torch.tensor([[p, 1 - p], [p, 1 - p]]))
    m = metrics.evaluate_logits(logits, torch.tensor([0, 1]), [10, 10])
    assert m["nll"] == pytest.approx((-math.log(p) - math.log(1 - p)) / 2, rel=1e-5)
    assert m["ece"] == pytest.approx(100 * abs(0.5 - p), rel=1e-5)  # one bin, accuracy .5, confidence .8
    # confidences in different bins: |1 - .95| * 1/2 + |0 - .65| * 1/2
    logits = torch.log(torch.tensor([[0.95, 0.05], [0.35, 0.65]]))
    m = metrics.evaluate_logits(logits, torch.tensor([0, 0]), [10, 10])
    assert m["ece"] == pytest.approx(100 * (0.05 + 0.65) / 2, rel=1e-4)


def test_sums_add_up_across_shards():
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(101, 4, generator=g), torch.randint(0, 4, (101,), generator=g)
    whole = metrics.accumulate(logits, y, 4)
    parts = metrics.accumulate(logits[:50], y[:50], 4) + metrics.accumulate(logits[50:], y[50:], 4)
    assert torch.allclose(whole, parts)


def test_tau_chosen_on_validation_differs_from_the_test_oracle():
    # Two classes, prior (0.9, 0.1): log-prior gap 2.197. Each image's logit margin (class 0 minus class 1)
    # decides at which tau it flips to class 1: an image flips once tau * 2.197 exceeds its margin.
    lp = losses.log_prior([90, 10])
    gap = float(lp[0] - lp[1])

    def split(margins, labels):
        logits = torch.stack([torch.tensor(margins), torch.zeros(len(margins))], 1)
        return logits, torch.tensor(labels)

    # validation: the class-1 image flips at tau 0.5, the class-0 image at tau 1.5 -> best tau in [0.5, 1.5)
    val = split([0.5 * gap, 1.5 * gap], [1, 0])
    # test: class-1 images flip at 0.5 and 2.5, class-0 image at 3.5 -> oracle tau in [2.5, 3.5)
    test = split([0.5 * gap, 2.5 * gap, 3.5 * gap], [1, 1, 0])
    taus = tausweep.parse_grid("0:4:0.25")
    s = tausweep.sweep(val, test, lp, taus, "val-acc")
    assert 0.5 < s["validation_chosen"]["tau"] < 1.5 and s["validation_chosen"]["tau"] == 1.0  # tie -> nearest 1
    assert 2.5 < s["oracle_test_tuned"]["tau"] < 3.5
    assert s["oracle_test_tuned"]["test_balanced_acc"] == 100.0
    assert s["validation_chosen"]["test_balanced_acc"] == pytest.approx(75.0)


def margins_split(margins, labels, gap):
    """Two-class logits whose class-0 margin is margin * gap: the image flips to class 1 once tau exceeds margin."""
    m = torch.tensor(margins, dtype=torch.float32) * gap
    return torch.stack([m, torch.zeros(len(margins))], 1), torch.tensor(labels)


def choices(val, lp, default=1.0, taus=None):
    taus = taus or tausweep.parse_grid("0:3:0.05")
    hit, nll = tausweep.per_tau(*val, lp, taus)
    return {rule: tausweep.choose(rule, taus, hit, nll, val[1], 2, default) for rule in tausweep.RULES}


def test_validation_nll_rule_finds_the_calibrated_shift_where_accuracy_is_flat():
    # one image per class, both with class-0 margin 1.5 * gap: balanced NLL is symmetric in (1.5 - tau) * gap, so it
    # is least at tau = 1.5, while balanced accuracy is 50 % at every tau (a tie, which goes to tau = 1)
    lp = losses.log_prior([90, 10])
    gap = float(lp[0] - lp[1])
    picked = choices(margins_split([1.5, 1.5], [0, 1], gap), lp)
    assert picked["val-nll"] == 1.5 and picked["val-acc"] == 1.0 and picked["one-se"] == 1.0


def test_one_se_rule_keeps_the_default_unless_the_gain_exceeds_its_paired_standard_error():
    lp = losses.log_prior([90, 10])
    gap = float(lp[0] - lp[1])
    # class 1: 4 images right from tau 0.5, 2 more from tau 2, 4 never; class 0: 9 always right, 1 wrong from tau 2.
    # tau > 2 gains 2/10 on class 1 and loses 1/10 on class 0: balanced gain 0.05, paired SE (Agresti-Min: half
    # an image added to each cell) sqrt((3 - 2^2 / 12) / 12^2 + (2 - 1^2 / 12) / 12^2) / 2 = 0.089
    margins = [0.5] * 4 + [2.0] * 2 + [10.0] * 4 + [-10.0] * 9 + [2.0]
    val = margins_split(margins, [1] * 10 + [0] * 10, gap)
    taus = tausweep.parse_grid("0:3:0.05")
    hit, _ = tausweep.per_tau(*val, lp, taus)
    se = tausweep.gain_se(hit[taus.index(2.05)], hit[taus.index(1.0)], val[1], 2)
    assert se == pytest.approx(math.sqrt((3 - 4 / 12) / 144 + (2 - 1 / 12) / 144) / 2)
    picked = choices(val, lp)
    assert picked["val-acc"] == 2.05 and picked["one-se"] == 1.0  # 0.05 < 0.089: not worth leaving tau = 1
    # without the class-0 loss the gain is 0.1 against an SE of sqrt((3 - 4 / 12) / 144 + 1 / 144) / 2 = 0.080:
    # the rule moves
    val = margins_split(margins[:-1] + [-10.0], [1] * 10 + [0] * 10, gap)
    assert choices(val, lp)["one-se"] == 2.05


def test_la_runs_sweep_an_extra_shift_whose_default_is_none():
    lp = losses.log_prior([90, 10])
    gap = float(lp[0] - lp[1])
    val = margins_split([0.5, 1.5], [1, 0], gap)  # best extra t: anything in (0.5, 1.5); ties nearest t = 0
    test = margins_split([0.2, 0.7, 1.2], [1, 1, 0], gap)
    s = tausweep.sweep(val, test, lp, tausweep.parse_grid("0.25:2:0.25"), "val-acc", loss_tau=1.0)
    assert 0.0 in s["taus"]  # the default is always evaluated
    assert (s["paper_default"]["tau"], s["paper_default"]["total_tau"]) == (0.0, 1.0)
    assert (s["validation_chosen"]["tau"], s["validation_chosen"]["total_tau"]) == (0.75, 1.75)
    assert s["validation_chosen"]["rule"] == "val-acc" and s["oracle_test_tuned"]["tau"] == 0.75
    text = tausweep.describe(s)
    assert "LA loss alone (total tau 1)" in text and "LA loss + post-hoc, total tau 1 + t" in text
    assert "t=0.75  total 1.75" in text
    ce = tausweep.sweep(val, test, lp, tausweep.parse_grid("0:2:0.25"), "val-acc")
    assert ce["paper_default"]["tau"] == 1.0 and ce["validation_chosen"]["tau"] == 1.0  # tie nearest 1 after CE


def test_float_noise_does_not_break_a_tie():
    # 79.5 computed two ways differs in the last bit; both are the best, and the tie goes to the tau nearest 1
    assert tausweep._best([2.0, 2.45], [79.5, 79.50000000000001]) == 2.0
    assert tausweep._best([0.5, 1.5, 2.0], [70.0, 70.0, 71.0]) == 2.0


def test_tau_grid_includes_its_end():
    assert tausweep.parse_grid("0:3:0.05")[-1] == 3.0 and len(tausweep.parse_grid("0:3:0.05")) == 61


def test_eval_table_leads_with_balanced_accuracy(capsys):
    """On a test set that is not balanced (--dataset folder / list) balanced accuracy is the headline: eval.py's table
    gives it first, top-1 beside it, each with its interval."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("eval_script", REPO / "eval.py")
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    logits = torch.tensor([[2.0, 0.0]] * 4)  # all predicted class 0: 3 of 4 right, but class 1's recall is 0
    m = metrics.evaluate_logits(logits, torch.tensor([0, 0, 0, 1]), [3, 1])
    ev.print_table("t", {"raw": m}, rows=ev.ACCURACY_ROWS)
    rows = capsys.readouterr().out.splitlines()[3:]
    assert rows[0].split()[:2] == ["balanced", "acc"] and float(rows[0].split()[2]) == pytest.approx(50.0)
    assert rows[2].split()[0] == "top-1" and float(rows[2].split()[1]) == pytest.approx(75.0)
    assert [r.split()[0] for r in rows] == ["balanced", "95", "top-1", "95"]
