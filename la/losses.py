"""Logit adjustment (Menon et al., 2020) in three functions, and the baselines it is compared with.

Training with the LA loss shifts the logits by +tau*log(prior) inside the softmax, so the raw logits learn
the balanced posterior; post-hoc adjustment instead subtracts tau*log(prior) from a plain-CE model's logits
at prediction time. The baselines: LDAM (Cao et al., 2019), an additive per-class margin on a cosine
classifier; deferred re-weighting (DRW), class-balanced loss weights (Cui et al., 2019) from a late epoch;
and post-hoc weight normalisation (Kang et al., 2020), which rescales each class's classifier weights.
"""
import torch
import torch.nn.functional as F
from torch import nn

from la import dist


def log_prior(counts):
    """log pi_y, pi the class frequency of the long-tailed training set (counts: C training images per class);
    a class with no image has -inf."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    return (counts / counts.sum()).log().float()


def logit_adjusted_ce(logits, targets, log_pi, tau=1.0, weight=None, reduction="mean"):
    """Softmax cross-entropy on f(x) + tau * log pi (log_pi from log_prior); tau = 0 is plain cross-entropy."""
    return F.cross_entropy(logits + tau * torch.as_tensor(log_pi).to(logits), targets, weight=weight,
                           reduction=reduction)


class LogitAdjustedLoss(nn.Module):
    """The logit-adjusted loss as a drop-in criterion: LogitAdjustedLoss(train_counts, tau)(logits, targets)."""

    def __init__(self, class_counts, tau=1.0, reduction="mean"):
        super().__init__()
        self.tau, self.reduction = tau, reduction
        self.register_buffer("log_pi", log_prior(class_counts))

    def forward(self, logits, targets):
        return logit_adjusted_ce(logits, targets, self.log_pi, self.tau, reduction=self.reduction)


def posthoc_adjust(logits, log_pi, tau=1.0):
    """The post-hoc rule: predict argmax f(x) - tau * log pi (log_pi from log_prior). Tensors or arrays in, a tensor out."""
    logits = torch.as_tensor(logits)
    return logits - tau * torch.as_tensor(log_pi).to(logits)


def ldam_margins(counts, max_margin=0.5):
    """LDAM's per-class margins: proportional to n_y^(-1/4), the rarest class's equal to max_margin."""
    m = torch.as_tensor(counts, dtype=torch.float64) ** -0.25
    return (m * (max_margin / m.max())).float()


def ldam_loss(logits, targets, margins, scale, weight=None, reduction="mean"):
    """LDAM on a cosine classifier whose logits are scale * cos(x, w_y): cross-entropy after the target's
    cosine is lowered by its class margin, i.e. its logit by scale * m_y."""
    margin = scale * margins.to(logits)[targets]
    shifted = logits - F.one_hot(targets, logits.shape[1]).to(logits) * margin[:, None]
    return F.cross_entropy(shifted, targets, weight=weight, reduction=reduction)


def class_balanced_weights(counts, beta=0.9999):
    """Class-balanced weights (Cui et al., 2019) as LDAM-DRW's code computes them: (1 - beta) / (1 - beta^n_y),
    rescaled to sum to the number of classes."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    w = (1 - beta) / (1 - beta ** n)
    return (w * (len(n) / w.sum())).float()


def weight_normalized_logits(features, weight, tau):
    """Post-hoc weight normalisation: logits phi(x) . w_y / ||w_y||^tau. The bias is dropped, as Kang et al.'s
    tau-normalised classifier does; tau = 0 is the linear head without its bias."""
    w = weight.float()
    return features.float() @ (w / w.norm(dim=1, keepdim=True) ** tau).T


class Criterion:
    """The training loss, called as loss(logits, targets): 'ce', 'la' (tau) or 'ldam' (max_margin, scale).

    With drw_epoch set, cross-entropy is weighted per class by class_balanced_weights(counts, drw_beta) from that
    epoch on (set_epoch switches it); before it every weight is 1, which is bit for bit the unweighted loss. The
    weights and log-prior stay on the training device and change in place: copying them there every step would
    make the host wait for the GPU, and a recorded CUDA graph reads the same tensor.

    A weighted loss is the weighted mean over the global batch, sum_i w_i l_i / sum_i w_i, on any number of
    processes. Under DDP, which averages the ranks' gradients, each of world_size ranks returns
    world_size * sum_rank w_i l_i / sum_global w_i, the global sum of weights taken with one all_reduce per step;
    the ranks' mean is then the one-process loss (a rank's own weighted mean would not be: with rho = 100 the
    weights are ~79x apart, so its normaliser would depend on which tail images its shard drew). One process pays
    no collective, so the CUDA-graph step (one process only) records none.
    """

    def __init__(self, name, counts, tau=1.0, device="cpu", drw_epoch=None, drw_beta=0.9999, max_margin=0.5,
                 scale=30.0, world_size=1):
        self.name, self.tau, self.scale, self.drw_epoch, self.world_size = name, tau, scale, drw_epoch, world_size
        self.log_pi = log_prior(counts).to(device)
        self.margins = ldam_margins(counts, max_margin).to(device)
        self.balanced = class_balanced_weights(counts, drw_beta).to(device) if drw_epoch is not None else None
        self.weight = None if drw_epoch is None else torch.ones(len(counts), device=device)

    def set_epoch(self, epoch):
        """epoch counts from 0: re-weighting starts with the epoch logged as drw_epoch + 1."""
        if self.weight is not None:
            self.weight.copy_(self.balanced if epoch >= self.drw_epoch else torch.ones_like(self.weight))

    def __call__(self, logits, targets):
        global_mean = self.weight is not None and self.world_size > 1
        loss = self._loss(logits, targets, "sum" if global_mean else "mean")
        if not global_mean:
            return loss
        norm = dist.all_reduce_sum(self.weight[targets].sum())  # no gradient flows through the weights
        return loss * (self.world_size / norm)

    def _loss(self, logits, targets, reduction):
        if self.name == "la":
            return logit_adjusted_ce(logits, targets, self.log_pi, self.tau, self.weight, reduction)
        if self.name == "ldam":
            return ldam_loss(logits, targets, self.margins, self.scale, self.weight, reduction)
        return F.cross_entropy(logits, targets, weight=self.weight, reduction=reduction)


def from_config(loss_cfg, counts, device="cpu", world_size=1):
    """The criterion a config's loss section describes, for a run of world_size processes."""
    return Criterion(loss_cfg.name, counts, loss_cfg.tau, device, loss_cfg.drw_epoch if loss_cfg.drw else None,
                     loss_cfg.drw_beta, loss_cfg.ldam_max_margin, loss_cfg.ldam_scale, world_size)
