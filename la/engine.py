"""The training step and evaluation passes, shared by train.py, eval.py and scripts/bench.py."""
import torch

from la import data, dist, metrics, precision


def train_step(model, criterion, optimizer, x, y, prec, device):
    """One SGD step: forward under autocast, fp32 loss, backward, update. Returns (loss, logits), detached."""
    with precision.autocast(prec, device):
        logits = model(x)
    loss = criterion(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


@torch.no_grad()
def compute_logits(model, x, device, prec, channels_last, batch_size=1024):
    """fp32 logits of a uint8 N x 3 x 32 x 32 array, in order, on the CPU."""
    model.eval()
    normalize = data.Normalize(device, channels_last)
    x = torch.as_tensor(x)
    out = []
    for i in range(0, len(x), batch_size):
        with precision.autocast(prec, device):
            out.append(model(normalize(x[i:i + batch_size].to(device))).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def evaluate(model, x, y, train_counts, ctx, prec, channels_last, batch_size=1024):
    """Metrics on a split, each rank taking a disjoint contiguous shard: every image counted exactly once."""
    lo, hi = len(y) * ctx.rank // ctx.world_size, len(y) * (ctx.rank + 1) // ctx.world_size
    n_classes = len(train_counts)
    sums = torch.zeros(2 * n_classes + 1 + 3 * metrics.ECE_BINS, dtype=torch.float64)
    if hi > lo:
        logits = compute_logits(model, x[lo:hi], ctx.device, prec, channels_last, batch_size)
        sums = metrics.accumulate(logits, torch.as_tensor(y[lo:hi]), n_classes)
    sums = dist.all_reduce_sum(sums.to(ctx.device)).cpu()
    return metrics.summarize(sums, n_classes, train_counts)
