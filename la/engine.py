"""The training step, an epoch of them, and evaluation passes, shared by train.py, eval.py and scripts/bench.py."""
import os
import signal

import torch
from torch.optim.sgd import sgd

from la import data, dist, metrics
from la.runtime import autocast


def train_step(model, criterion, optimizer, x, y, prec, device):
    """One SGD step: forward under autocast, fp32 loss, backward, update. Returns (loss, logits), detached."""
    with autocast(prec, device):
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
    - each parameter group (weight decay on some tensors only: optim.decay_params) is updated with its own
      hyper-parameters; its learning rate is read from a device scalar that is refilled from param_groups
      before each step, so the schedule reaches the recorded graph;
    - batches of another size than `batch_size` (an epoch's short last batch) and the first `warmup` steps
      run the same function eagerly.

    Set graph=False to run every step eagerly through the same function (the CPU tests do).
    Single process only: DistributedDataParallel's gradient hooks are not recorded here.
    """

    def __init__(self, model, criterion, optimizer, prec, device, batch_size, graph=True, warmup=3):
        self.model, self.criterion, self.optimizer, self.prec, self.device = model, criterion, optimizer, prec, device
        self.lrs = [torch.zeros((), device=device) for _ in optimizer.param_groups]
        self.batch_size, self.graph, self.warmup = batch_size, graph, warmup
        self.recorded = None  # (graph, static x, static y, static (loss, logits))

    def _step(self, x, y):
        # the backward then allocates fresh gradients; while recording, from the graph's own memory
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.prec, self.device, cache=False):  # a cached cast would outlive the recording
            logits = self.model(x)
        loss = self.criterion(logits.float(), y)
        loss.backward()
        state = self.optimizer.state
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            params = group["params"]
            buffers = [state[p].get("momentum_buffer") for p in params]
            with torch.no_grad():
                sgd(params, [p.grad for p in params], buffers, fused=True, lr=lr,
                    weight_decay=group["weight_decay"], momentum=group["momentum"], dampening=group["dampening"],
                    nesterov=group["nesterov"], maximize=group["maximize"])
            for p, b in zip(params, buffers):  # the first step creates them
                state[p]["momentum_buffer"] = b
        return loss.detach(), logits.detach()

    def __call__(self, x, y):
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            lr.fill_(group["lr"])
        # the update is optimizer.step()'s own, in functional form: tell the LR scheduler so, which would
        # otherwise warn that a rate was skipped (torch's flag for it; no process-wide warnings filter)
        self.optimizer._opt_called = True
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


def make_train_step(model, criterion, optimizer, rt, batch_size):
    """The step train.py and scripts/bench.py call: (x, y) -> (loss, logits), at the Runtime rt's precision. With
    rt.cuda_graph, batches of batch_size images replay one recorded graph."""
    if rt.cuda_graph:
        return GraphedTrainStep(model, criterion, optimizer, rt.precision, rt.device, batch_size)
    return lambda x, y: train_step(model, criterion, optimizer, x, y, rt.precision, rt.device)


# ---------------------------------------------------------------- an epoch

CHECK_EVERY_CUDA = 32  # steps between reads of the stop and non-finite flags on a GPU, where a read stalls the queue


class StopFlag:
    """SIGTERM/SIGINT ask train_epoch to finish its step and return, so the run can checkpoint and exit; a second
    signal kills at once."""

    def __init__(self):
        self.signum = None
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum


class NonFiniteLoss(Exception):
    """A step's loss was NaN or infinite; the message names the step (or the steps since the last check)."""


class Meter:
    """An epoch's running sums over this rank's images, [loss x images, correct, images], and whether any loss was
    non-finite. They stay on the device: reading a value there stalls a GPU's queue."""

    def __init__(self, device, partial=None):
        partial = torch.zeros(3, dtype=torch.float64) if partial is None else partial
        self.sums = partial.to(device, copy=True)
        self.one = torch.ones((), dtype=torch.float64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    @torch.no_grad()
    def add(self, loss, logits, y):
        self.sums += torch.stack([loss.double() * len(y), (logits.argmax(1) == y).sum().double(), self.one * len(y)])
        self.nonfinite |= ~torch.isfinite(loss)

    def totals(self):
        """The sums over every rank, on the CPU (a collective: every rank calls it)."""
        return dist.all_reduce_sum(self.sums).cpu()


def _stop_asked(meter, stop, first, last):
    """Whether a stop signal reached any rank; a non-finite loss on any rank in steps first..last raises."""
    asked = stop is not None and stop.signum is not None
    flags = dist.all_reduce_sum(torch.stack([meter.one * asked, meter.nonfinite.double()]))
    if flags[1] > 0:
        raise NonFiniteLoss(f"step {last}" if first == last else f"steps {first}-{last}")
    return bool(flags[0] > 0)


def train_epoch(t, batches, meter, stop=None, step=0, bar=None):
    """Train a la.build.Training on `batches`, the epoch's from step `step` on: each step, the schedule, the running
    sums (meter), and every few steps and after the last, whether to stop: a stop signal on any rank, or a
    non-finite loss (NonFiniteLoss). Returns (the learning rate the last step used, steps done counted from the
    epoch's start, whether a stop signal ended it early). scripts/bench.py times this very function."""
    check_every = 1 if meter.sums.device.type == "cpu" else CHECK_EVERY_CUDA
    lr, checked = None, step
    for x, y in batches:
        loss, logits = t.step(x, y)
        lr = t.optimizer.param_groups[0]["lr"]  # the rate this step used
        t.scheduler.step()
        meter.add(loss, logits, y)
        step += 1
        if bar is not None:
            bar.update()
        if step % check_every == 0:
            if _stop_asked(meter, stop, checked + 1, step):
                return lr, step, True
            checked = step
    if step > checked and _stop_asked(meter, stop, checked + 1, step):
        return lr, step, True
    return lr, step, False


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def compute_logits(model, x, rt, batch_size=1024, features=False, normalize="mean_std"):
    """fp32 logits of a uint8 N x 3 x 32 x 32 array (or a la.data.folder.ImageList), in order, on the CPU, at the
    Runtime rt's device, precision and memory format, the input scaled as data.normalize `normalize` says (the run's
    own); with features=True also the penultimate features (what the classifier `model.fc` reads), as
    (logits, features)."""
    model.eval()
    if hasattr(x, "eval_batches"):  # la.data.folder.ImageList: decoded from files as it goes
        normalize = data.Normalize(rt.device, rt.channels_last, normalize, mean=x.mean, std=x.std)
        chunks = x.eval_batches(batch_size, rt.device)
    else:
        x, normalize = torch.as_tensor(x), data.Normalize(rt.device, rt.channels_last, normalize)
        chunks = (x[i:i + batch_size] for i in range(0, len(x), batch_size))
    out, feats = [], []
    hook = features and model.fc.register_forward_pre_hook(lambda module, args: feats.append(args[0].float().cpu()))
    try:
        for chunk in chunks:
            with rt.autocast():
                out.append(model(normalize(chunk.to(rt.device))).float().cpu())
    finally:
        if hook:
            hook.remove()
    logits = torch.cat(out) if out else torch.zeros(0, 0)
    return (logits, torch.cat(feats) if feats else torch.zeros(0, 0)) if features else logits


def evaluate(model, x, y, train_counts, ctx, rt, batch_size=1024, normalize="mean_std"):
    """Metrics on a split, each rank taking a disjoint contiguous shard: every image counted exactly once."""
    lo, hi = len(y) * ctx.rank // ctx.world_size, len(y) * (ctx.rank + 1) // ctx.world_size
    n_classes = len(train_counts)
    sums = torch.zeros(2 * n_classes + 1 + 3 * metrics.ECE_BINS, dtype=torch.float64)
    if hi > lo:
        logits = compute_logits(model, x[lo:hi], rt, batch_size, normalize=normalize)
        sums = metrics.accumulate(logits, torch.as_tensor(y[lo:hi]), n_classes)
    sums = dist.all_reduce_sum(sums.to(ctx.device)).cpu()
    return metrics.summarize(sums, n_classes, train_counts)


def evaluate_splits(model, splits, ctx, rt, batch_size=1024, normalize="mean_std"):
    """{val,test}_{top1,balanced_acc} of the validation and test splits (a split without images is left out)."""
    record = {}
    for name, x, y in (("val", splits.val_x, splits.val_y), ("test", splits.test_x, splits.test_y)):
        if len(y):
            m = evaluate(model, x, y, splits.counts, ctx, rt, batch_size, normalize)
            record.update({f"{name}_top1": m["top1"], f"{name}_balanced_acc": m["balanced_acc"]})
    return record
