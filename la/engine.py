"""The training step and evaluation passes, shared by train.py, eval.py and scripts/bench.py."""
import warnings

import torch
from torch.optim.sgd import sgd

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


class GraphedTrainStep:
    """train_step recorded once as a CUDA graph and replayed for every full batch.

    A ResNet-32 step at batch 128 is some hundreds of small kernels; on a GPU, launching them from Python
    takes longer than running them, so an eager loop leaves the card idle most of the time. A replay
    launches the whole step (forward, loss, backward, SGD update) at once. The recipe is unchanged:

    - the update is torch's own SGD (the functional form of torch.optim.SGD, fused kernel) with the
      optimizer's hyper-parameters and momentum buffers, so checkpoints are the usual optimizer state;
    - the learning rate is read from a device scalar that is refilled from param_groups before each step,
      so the schedule reaches the recorded graph;
    - batches of another size than `batch_size` (an epoch's short last batch) and the first `warmup` steps
      run the same function eagerly.

    Set graph=False to run every step eagerly through the same function (the CPU tests do).
    Single process only: DistributedDataParallel's gradient hooks are not recorded here.
    """

    def __init__(self, model, criterion, optimizer, prec, device, batch_size, graph=True, warmup=3):
        if len(optimizer.param_groups) != 1:
            raise ValueError("GraphedTrainStep expects one parameter group")
        self.model, self.criterion, self.optimizer, self.prec, self.device = model, criterion, optimizer, prec, device
        self.params = optimizer.param_groups[0]["params"]
        self.lr = torch.zeros((), device=device)
        self.batch_size, self.graph, self.warmup = batch_size, graph, warmup
        self.recorded = None  # (graph, static x, static y, static (loss, logits))
        # torch's LR schedulers warn if optimizer.step() was never called; the update here is the same step in
        # its functional form, so the warning (and its claim that a rate is skipped) would be false
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")

    def _step(self, x, y):
        # the backward then allocates fresh gradients; while recording, from the graph's own memory
        self.optimizer.zero_grad(set_to_none=True)
        with precision.autocast(self.prec, self.device, cache=False):  # a cached cast would outlive the recording
            logits = self.model(x)
        loss = self.criterion(logits.float(), y)
        loss.backward()
        group, state = self.optimizer.param_groups[0], self.optimizer.state
        buffers = [state[p].get("momentum_buffer") for p in self.params]
        with torch.no_grad():
            sgd(self.params, [p.grad for p in self.params], buffers, fused=True, lr=self.lr,
                weight_decay=group["weight_decay"], momentum=group["momentum"], dampening=group["dampening"],
                nesterov=group["nesterov"], maximize=group["maximize"])
        for p, b in zip(self.params, buffers):  # the first step creates them
            state[p]["momentum_buffer"] = b
        return loss.detach(), logits.detach()

    def __call__(self, x, y):
        self.lr.fill_(self.optimizer.param_groups[0]["lr"])
        if not self.graph or len(y) != self.batch_size:
            return self._step(x, y)
        if self.recorded is None and self.warmup > 0:  # lets cuDNN and the allocator settle before recording
            self.warmup -= 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self._step(x, y)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        if self.recorded is None:
            static_x, static_y = x.clone(), y.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._step(static_x, static_y)
            self.recorded = graph, static_x, static_y, out
        graph, static_x, static_y, out = self.recorded
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        return out


def make_train_step(model, criterion, optimizer, prec, device, cuda_graph, batch_size):
    """The step train.py and scripts/bench.py call: (x, y) -> (loss, logits). With cuda_graph, batches of
    batch_size images replay one recorded graph."""
    if cuda_graph:
        return GraphedTrainStep(model, criterion, optimizer, prec, device, batch_size)
    return lambda x, y: train_step(model, criterion, optimizer, x, y, prec, device)


@torch.no_grad()
def compute_logits(model, x, device, prec, channels_last, batch_size=1024, features=False):
    """fp32 logits of a uint8 N x 3 x 32 x 32 array, in order, on the CPU; with features=True also the
    penultimate features (what the classifier `model.fc` reads), as (logits, features)."""
    model.eval()
    normalize = data.Normalize(device, channels_last)
    x = torch.as_tensor(x)
    out, feats = [], []
    hook = features and model.fc.register_forward_pre_hook(lambda module, args: feats.append(args[0].float().cpu()))
    try:
        for i in range(0, len(x), batch_size):
            with precision.autocast(prec, device):
                out.append(model(normalize(x[i:i + batch_size].to(device))).float().cpu())
    finally:
        if hook:
            hook.remove()
    logits = torch.cat(out) if out else torch.zeros(0, 0)
    return (logits, torch.cat(feats) if feats else torch.zeros(0, 0)) if features else logits


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
