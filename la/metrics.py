"""Every number the repo reports, from one vector of sums.

Metrics are accumulated as sums (per-class correct and count, NLL, calibration bins) so a
distributed evaluation adds them with one all_reduce and counts each image exactly once.
"""
import math

import torch
import torch.nn.functional as F

ECE_BINS = 15
Z95 = 1.959964  # two-sided 95 % normal quantile
SHOTS = (("many", lambda n: n > 100), ("medium", lambda n: 20 <= n <= 100), ("few", lambda n: n < 20))


def accumulate(logits, labels, num_classes):
    """Sums for one batch: [correct per class | count per class | nll | bin count | bin confidence | bin correct]."""
    logits, labels = logits.float(), labels.long()
    log_probs = F.log_softmax(logits, dim=1)
    conf, pred = log_probs.exp().max(dim=1)
    hit = (pred == labels).double()
    bins = (conf * ECE_BINS).long().clamp(max=ECE_BINS - 1)
    sums = [
        torch.bincount(labels, weights=hit, minlength=num_classes),
        torch.bincount(labels, minlength=num_classes).double(),
        -log_probs.gather(1, labels[:, None]).double().sum().view(1),
        torch.bincount(bins, minlength=ECE_BINS).double(),
        torch.bincount(bins, weights=conf.double(), minlength=ECE_BINS),
        torch.bincount(bins, weights=hit, minlength=ECE_BINS),
    ]
    return torch.cat([s.to(torch.float64) for s in sums])


def summarize(sums, num_classes, train_counts):
    """Turn accumulated sums into the reported metrics (percentages; NLL in nats; ECE in %)."""
    sums = sums.cpu()
    c = num_classes
    correct, count = sums[:c], sums[c:2 * c]
    nll = sums[2 * c]
    b_count, b_conf, b_hit = sums[2 * c + 1:].view(3, ECE_BINS)
    total = count.sum()
    per_class = torch.where(count > 0, correct / count.clamp(min=1), torch.nan)
    seen = count > 0
    out = {
        "top1": 100 * float(correct.sum() / total),
        "top1_ci95": wilson_ci95(float(correct.sum()), float(total)),
        "balanced_acc": 100 * float(per_class[seen].mean()),
        "balanced_acc_ci95": balanced_ci95(correct[seen].tolist(), count[seen].tolist()),
        "images": int(total),
        "nll": float(nll / total),
        "ece": 100 * float((b_hit - b_conf).abs().sum() / total),
        "per_class": [None if not s else round(100 * float(a), 4) for a, s in zip(per_class, seen)],
    }
    for name, in_group in SHOTS:
        members = [i for i, n in enumerate(train_counts) if in_group(n) and seen[i]]
        out[name] = 100 * float(per_class[members].mean()) if members else None
    return out


def wilson_ci95(k, n):
    """95 % Wilson score interval of a binomial proportion k / n, in percent: [low, high]."""
    p, z2 = k / n, Z95 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return [100 * max(0.0, centre - half), 100 * min(1.0, centre + half)]


def balanced_se(correct, count):
    """Standard error of balanced accuracy (a fraction), each class a binomial with Agresti and Coull's adjustment
    (z^2 / 2, about two, images added both right and wrong): var = sum_c p~_c (1 - p~_c) / n~_c / C^2 with
    n~_c = n_c + z^2 and p~_c = (k_c + z^2 / 2) / n~_c. A class at 0 or 100 % (a tail class of few test images)
    keeps its uncertainty, where the plain p_c (1 - p_c) gives it none: classes all at 0 or 100 % gave an
    interval of zero width. Classes of many images are as before (1,000 per class: the interval moves by under
    0.001 points)."""
    z2 = Z95 ** 2
    var = sum((k + z2 / 2) * (n - k + z2 / 2) / (n + z2) ** 3 for k, n in zip(correct, count))
    return math.sqrt(var) / len(count)


def balanced_ci95(correct, count):
    """95 % interval of balanced accuracy, in percent: the measured balanced accuracy +- z balanced_se (whose
    per-class terms stay honest at 0 and 100 %), clipped to [0, 100]."""
    acc = sum(k / n for k, n in zip(correct, count)) / len(count)
    half = Z95 * balanced_se(correct, count)
    return [100 * max(0.0, acc - half), 100 * min(1.0, acc + half)]


def evaluate_logits(logits, labels, train_counts):
    num_classes = logits.shape[1]
    return summarize(accumulate(logits, labels, num_classes), num_classes, train_counts)


def balanced_accuracy(logits, labels):
    """Balanced accuracy of argmax logits (N x C) against labels (N): the mean over the classes present of each
    class's accuracy, in percent, and its 95 % interval [low, high] (balanced_ci95)."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels).long()
    out = evaluate_logits(logits, labels, [1] * logits.shape[1])  # train counts only sort shot groups, unused here
    return out["balanced_acc"], out["balanced_acc_ci95"]
