"""Choosing the post-hoc tau without peeking: a named rule on the validation split, the test-tuned tau* kept apart.

On a model trained with the logit-adjusted loss (its logits already shifted by loss_tau * log pi), the
sweep is over an extra post-hoc t, a total shift of loss_tau + t; the default is no extra shift.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from la import UserError, losses, metrics

RULES = {
    "val-acc": "maximum validation balanced accuracy",
    "val-nll": "minimum validation balanced NLL",
    "one-se": "the default unless the validation gain in balanced accuracy exceeds its standard error",
}
DEFAULT_RULE = "val-nll"  # chosen in results/tau_rules.md (RESULTS.md, "Choosing tau")
DEFAULT_GRID = "0:3:0.05"


def parse_grid(spec):
    """'START:STOP:STEP' -> taus from START to STOP inclusive."""
    try:
        start, stop, step = (float(v) for v in spec.split(":"))
    except ValueError:
        raise UserError(f"--taus expects START:STOP:STEP, got {spec!r}")
    if not all(map(np.isfinite, (start, stop, step))) or step <= 0 or stop < start:
        raise UserError(f"--taus {spec}: need finite numbers, STEP > 0 and STOP >= START")
    if (stop - start) / step > 10_000:
        raise UserError(f"--taus {spec}: more than 10,000 values; use a larger STEP")
    return [round(t, 10) for t in np.arange(start, stop + step / 2, step)]


def per_tau(logits, labels, log_pi, taus):
    """(hit, nll): T x N, whether argmax f(x) - tau * log pi is right and its NLL, for each tau and image."""
    return curves(lambda tau: losses.posthoc_adjust(logits.float(), log_pi, tau), labels, taus)


def curves(logits_at, labels, taus):
    """(hit, nll): T x N, whether argmax logits_at(tau) is right and its NLL, for each tau and image."""
    hits, nlls = [], []
    for tau in taus:
        z = logits_at(tau)
        hits.append(z.argmax(1) == labels)
        nlls.append(F.cross_entropy(z, labels, reduction="none"))
    return torch.stack(hits), torch.stack(nlls).double()


def class_means(values, labels, num_classes):
    """T x N -> T x C: the mean over each class's images (classes without one are NaN)."""
    sums = torch.zeros(values.shape[0], num_classes, dtype=torch.float64).index_add_(1, labels, values.double())
    counts = torch.bincount(labels, minlength=num_classes).double()
    return sums / torch.where(counts > 0, counts, torch.nan)


def balanced(values, labels, num_classes):
    """T x N -> T: the mean over the classes present of each class's mean."""
    means = class_means(values, labels, num_classes)
    return means[:, ~means[0].isnan()].mean(1)


def gain_se(hit_a, hit_b, labels, num_classes):
    """Standard error of balanced accuracy's difference a - b measured on the same images (a fraction). Each class
    is a paired 2 x 2 table with Agresti and Min's (2005) adjustment, half an image added to each cell: with b~ and
    c~ the images only a, or only b, gets right (+ 0.5) and n~ = n_c + 2, var_c = (b~ + c~ - (b~ - c~)^2 / n~) /
    n~^2; var = sum_c var_c / C^2. A class where a and b agree on every image keeps some uncertainty, where the
    plain per-image variance gives it none (as metrics.balanced_se's classes at 0 or 100 %)."""
    d = hit_a.long() - hit_b.long()
    counts = torch.bincount(labels, minlength=num_classes).double()
    b = torch.bincount(labels[d > 0], minlength=num_classes).double() + 0.5
    c = torch.bincount(labels[d < 0], minlength=num_classes).double() + 0.5
    n, present = counts + 2, counts > 0
    var = ((b + c - (b - c) ** 2 / n) / n ** 2)[present].sum()
    return math.sqrt(float(var)) / int(present.sum())


def _best(taus, scores, default=1.0):
    """The tau with the highest score; ties go to the tau nearest the default (the paper's total shift of 1).

    Scores are means of per-class fractions, so equal accuracies can differ in the last float bit:
    a tie is anything within 1e-9 of the best.
    """
    best = max(scores)
    return min((abs(t - default), t) for t, s in zip(taus, scores) if s >= best - 1e-9)[1]


def choose(rule, taus, hit, nll, labels, num_classes, default):
    """The tau a rule picks from validation curves (hit, nll: T x N over taus, which include default)."""
    acc = balanced(hit, labels, num_classes).tolist()
    if rule == "val-nll":
        return _best(taus, [-v for v in balanced(nll, labels, num_classes).tolist()], default)
    best = _best(taus, acc, default)
    if rule == "val-acc":
        return best
    if rule == "one-se":
        i, j = taus.index(best), taus.index(default)
        return best if acc[i] - acc[j] > gain_se(hit[i], hit[j], labels, num_classes) else default
    raise UserError(f"unknown tau rule {rule!r}; one of {', '.join(RULES)}")


def choose_tau(val_logits, val_labels, log_prior, rule=DEFAULT_RULE, taus=None, default=1.0):
    """The post-hoc tau a rule (one of RULES) picks on held-out validation logits (N x C) and labels, over taus
    (default 0 to 3 by 0.05, default included; ties go to the tau nearest default). Returns (tau, sweep), sweep
    {"taus", "val_balanced_acc" (%), "val_balanced_nll"}: the validation curves the choice was made from."""
    taus = sorted(set(parse_grid(DEFAULT_GRID) if taus is None else map(float, taus)) | {default})
    logits, labels = torch.as_tensor(val_logits), torch.as_tensor(val_labels).long()
    num_classes = logits.shape[1]
    hit, nll = per_tau(logits, labels, torch.as_tensor(log_prior), taus)
    tau = choose(rule, taus, hit, nll, labels, num_classes, default)
    return tau, {"taus": taus, "val_balanced_acc": (100 * balanced(hit, labels, num_classes)).tolist(),
                 "val_balanced_nll": balanced(nll, labels, num_classes).tolist()}


def _result(val, test, log_pi, tau, loss_tau):
    adjust = lambda logits, t: losses.posthoc_adjust(logits, log_pi, t)
    return {"tau": tau, "total_tau": loss_tau + tau, **_metrics(val, test, adjust, tau, len(log_pi))}


def _metrics(val, test, logits_at, tau, num_classes):
    """Accuracies with 95 % intervals on both splits of logits_at(split's input, tau) (on test alone if val is None)."""
    counts = [1] * num_classes  # shot groups are not used here
    t = metrics.evaluate_logits(logits_at(test[0], tau), test[1], counts)
    out = {"test_top1": t["top1"], "test_top1_ci95": t["top1_ci95"],
           "test_balanced_acc": t["balanced_acc"], "test_balanced_acc_ci95": t["balanced_acc_ci95"]}
    if val is None:
        return out
    v = metrics.evaluate_logits(logits_at(val[0], tau), val[1], counts)
    return {"val_balanced_acc": v["balanced_acc"], "val_balanced_acc_ci95": v["balanced_acc_ci95"], **out}


def sweep(val, test, log_pi, taus, rule=DEFAULT_RULE, loss_tau=0.0):
    """Curves against tau on both splits and three labelled choices: the default (tau = 1 after CE, no extra
    shift after the LA loss), the rule's choice on validation, and the test-tuned oracle. Without a validation
    split (val None: logits from elsewhere) there are no validation curves and validation_chosen is None."""
    default = 0.0 if loss_tau else 1.0
    if val is None:
        chosen, val_curves = None, {"taus": sorted(set(taus) | {default})}
    else:
        chosen, val_curves = choose_tau(*val, log_pi, rule, taus, default)
    taus = val_curves["taus"]
    t_hit, _ = per_tau(*test, log_pi, taus)
    curve = {"taus": taus, "loss_tau": loss_tau, **val_curves,
             "test_balanced_acc": (100 * balanced(t_hit, test[1], len(log_pi))).tolist(),
             "test_top1": (100 * t_hit.double().mean(1)).tolist()}
    curve["paper_default"] = _result(val, test, log_pi, default, loss_tau)
    curve["validation_chosen"] = None if chosen is None else {"rule": rule, "rule_means": RULES[rule],
                                                              **_result(val, test, log_pi, chosen, loss_tau)}
    oracle = _best(taus, curve["test_balanced_acc"], default)
    curve["oracle_test_tuned"] = _result(val, test, log_pi, oracle, loss_tau)
    return curve


WNORM_RULE = "val-acc"  # the logits' scale changes with T, so their NLL says more about calibration than about T


def wnorm_sweep(val, test, weight, taus):
    """Post-hoc weight normalisation (Kang et al., 2020) of a CE run: predict argmax phi(x) . w_y / ||w_y||^T.
    val, test: (penultimate features, labels); weight: the classifier's C x D weights. Curves against T, and
    T = 1, T chosen on validation by maximum balanced accuracy (ties to the one nearest 1), the test-tuned oracle."""
    taus = sorted(set(taus) | {1.0})
    num_classes = weight.shape[0]
    logits_at = lambda feats, tau: losses.weight_normalized_logits(feats, weight, tau)
    v_hit, v_nll = curves(lambda tau: logits_at(val[0], tau), val[1], taus)
    t_hit, _ = curves(lambda tau: logits_at(test[0], tau), test[1], taus)
    out = {"taus": taus, "val_balanced_acc": (100 * balanced(v_hit, val[1], num_classes)).tolist(),
           "test_balanced_acc": (100 * balanced(t_hit, test[1], num_classes)).tolist(),
           "test_top1": (100 * t_hit.double().mean(1)).tolist()}
    chosen = choose(WNORM_RULE, taus, v_hit, v_nll, val[1], num_classes, 1.0)
    oracle = _best(taus, out["test_balanced_acc"], 1.0)
    result = lambda tau: {"tau": tau, **_metrics(val, test, logits_at, tau, num_classes)}
    out["paper_default"] = result(1.0)
    out["validation_chosen"] = {"rule": WNORM_RULE, "rule_means": RULES[WNORM_RULE], **result(chosen)}
    out["oracle_test_tuned"] = result(oracle)
    return out


def describe_wnorm(s):
    ci = lambda r, key: f"{r[key]:.2f} ({r[key + '_ci95'][0]:.2f}-{r[key + '_ci95'][1]:.2f})"
    lines = [f"\nweight normalisation w_y / ||w_y||^T (no bias), T swept over {len(s['taus'])} values "
             f"({s['taus'][0]:g}..{s['taus'][-1]:g}); rule {WNORM_RULE}: {RULES[WNORM_RULE]}"]
    for key, label in (("paper_default", "T = 1"), ("validation_chosen", f"T chosen on validation by rule {WNORM_RULE}"),
                       ("oracle_test_tuned", "T tuned on test (ORACLE)")):
        r = s[key]
        lines.append(f"  {label}\n      T={r['tau']:<5g}  test top-1 {ci(r, 'test_top1')}  "
                     f"test balanced {ci(r, 'test_balanced_acc')}  val balanced {ci(r, 'val_balanced_acc')}")
    return "\n".join(lines)


def describe(s):
    la = s["loss_tau"] != 0
    shift = lambda r: (f"t={r['tau']:<5g} total {r['total_tau']:<5g}" if la else f"tau={r['tau']:<5g}")
    rule = s["validation_chosen"] and s["validation_chosen"]["rule"]
    rows = (("paper_default", f"LA loss alone (total tau {s['loss_tau']:g})" if la else "tau = 1 (paper default)"),
            ("validation_chosen", (f"LA loss + post-hoc, total tau {s['loss_tau']:g} + t, t" if la else "tau")
             + f" chosen on validation by rule {rule} (the fair result)"),
            ("oracle_test_tuned", "tuned on test (ORACLE: compare only with the paper's tau* column)"))
    ci = lambda r, key: f"{r[key]:.2f} ({r[key + '_ci95'][0]:.2f}-{r[key + '_ci95'][1]:.2f})"
    how = f"rule {rule}: {RULES[rule]}" if rule else "no validation split, so no tau chosen on validation"
    lines = [f"\npost-hoc {'extra t' if la else 'tau'} swept over {len(s['taus'])} values "
             f"({s['taus'][0]:g}..{s['taus'][-1]:g}); {how}; 95 % intervals in parentheses"]
    for key, label in rows:
        r = s[key]
        if r is None:
            lines.append("  tau chosen on validation: none (no validation logits; the oracle below is not a fair result)")
            continue
        val = f"  val balanced {ci(r, 'val_balanced_acc')}" if "val_balanced_acc" in r else ""
        lines.append(f"  {label}\n      {shift(r)}  test top-1 {ci(r, 'test_top1')}  "
                     f"test balanced {ci(r, 'test_balanced_acc')}{val}")
    return "\n".join(lines)
