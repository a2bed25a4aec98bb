"""Logit adjustment (Menon et al., 2020) in three functions.

Training with the LA loss shifts the logits by +tau*log(prior) inside the softmax, so the
raw logits learn the balanced posterior; post-hoc adjustment instead subtracts
tau*log(prior) from a plain-CE model's logits at prediction time.
"""
import torch
import torch.nn.functional as F


def log_prior(counts):
    """log pi_y, pi the class frequency of the long-tailed training set."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    return (counts / counts.sum()).log().float()


def logit_adjusted_ce(logits, targets, log_pi, tau=1.0):
    """Softmax cross-entropy on f(x) + tau * log pi; tau = 0 is plain cross-entropy."""
    return F.cross_entropy(logits + tau * log_pi.to(logits), targets)


def posthoc_adjust(logits, log_pi, tau=1.0):
    """The post-hoc rule: predict argmax f(x) - tau * log pi."""
    return logits - tau * log_pi.to(logits)


def build_loss(name, counts, tau, device="cpu"):
    """The training criterion: 'ce' or 'la' (loss(logits, targets)), its log-prior kept on the training device:
    copying it there every step would make the host wait for the GPU."""
    if name == "ce":
        return F.cross_entropy
    log_pi = log_prior(counts).to(device)
    return lambda logits, targets: logit_adjusted_ce(logits, targets, log_pi, tau)
