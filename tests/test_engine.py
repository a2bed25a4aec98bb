"""la.engine's graphed step: the same SGD as torch.optim.SGD, fed by the optimizer's own state and schedule.

Recording and replaying a CUDA graph needs a GPU (scripts/reproduce_gpu.sh runs it there); these tests run
the graphed step's eager path, which is the very function the graph records, against the plain step.
"""
import copy

import pytest
import torch
from torch import nn

from la import UserError, engine, losses, runtime


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


def setup(nesterov, groups=1):
    """The model and its SGD: one parameter group, or (groups=2) weight decay on the convolution and linear layers
    only, as optim.decay_params makes them (la.build.optimizer)."""
    model = tiny_model()
    params = model.parameters()
    if groups == 2:
        params = [{"params": [model[0].weight, model[5].weight, model[5].bias]},
                  {"params": [model[0].bias, model[1].weight, model[1].bias], "weight_decay": 0.0}]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: [1.0, 0.5, 0.1, 0.01][min(s, 3)])
    return model, opt, sched


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("nesterov,groups", [(False, 1), (True, 1), (True, 2)])
def test_graphed_step_is_torch_sgd_with_its_schedule_and_momentum(nesterov, groups):
    criterion = losses.Criterion("la", [50, 20, 5, 1], 1.0, torch.device("cpu"))
    cpu = torch.device("cpu")
    (m1, o1, s1), (m2, o2, s2) = setup(nesterov, groups), setup(nesterov, groups)
    graphed = engine.GraphedTrainStep(m2, criterion, o2, "fp32", cpu, batch_size=6, graph=False)
    for x, y in batches(4):  # lr 0.1, 0.05, 0.01, 0.001: a step that ignored the schedule would drift
        loss1, logits1 = engine.train_step(m1, criterion, o1, x, y, "fp32", cpu)
        loss2, logits2 = graphed(x, y)
        s1.step(), s2.step()
        assert torch.allclose(loss1, loss2, atol=1e-6) and torch.allclose(logits1, logits2, atol=1e-5)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p1, p2, atol=1e-6)  # a group's own weight decay (0 on batch norm) is applied
        # the momentum buffers live in the optimizer's state, so checkpoints and resumes see them
        assert torch.allclose(o1.state[p1]["momentum_buffer"], o2.state[p2]["momentum_buffer"], atol=1e-6)
    assert torch.equal(m1[1].running_mean, m2[1].running_mean)


def test_a_graphed_run_checkpoint_resumes_as_a_plain_one():
    criterion = losses.Criterion("ce", [1, 1, 1, 1], 1.0, torch.device("cpu"))
    cpu = torch.device("cpu")
    model, opt, _ = setup(False)
    graphed = engine.GraphedTrainStep(model, criterion, opt, "fp32", cpu, batch_size=6, graph=False)
    data = batches(3)
    for x, y in data[:2]:
        graphed(x, y)
    model2, opt2, _ = setup(False)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as through a checkpoint file: no shared buffers
    engine.train_step(model, criterion, opt, *data[2], "fp32", cpu)
    engine.train_step(model2, criterion, opt2, *data[2], "fp32", cpu)
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)


def test_cuda_graph_auto_is_on_only_for_one_uncompiled_cuda_process():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.resolve_cuda_graph("auto", cuda, 1, compiled=False) is True
    assert runtime.resolve_cuda_graph("auto", cpu, 1, compiled=False) is False
    assert runtime.resolve_cuda_graph("auto", cuda, 2, compiled=False) is False
    assert runtime.resolve_cuda_graph("auto", cuda, 1, compiled=True) is False
    assert runtime.resolve_cuda_graph("false", cuda, 1, compiled=False) is False
    for world, compiled, why in ((2, False, "torchrun"), (1, True, "train.compile")):
        with pytest.raises(UserError, match=why):
            runtime.resolve_cuda_graph("true", cuda, world, compiled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="recording a CUDA graph needs a GPU")
def test_replayed_graph_trains_like_the_eager_step():
    """On a GPU: the recorded step, fed new batches and a changing rate, follows the eager path closely.
    A replay that kept its first batch or its first rate would drift far from it."""
    from la import models

    cuda = torch.device("cuda")
    criterion = losses.Criterion("la", [50, 30, 20, 12, 8, 5, 3, 2, 1, 1], 1.0, cuda)
    runs = []
    for graph in (False, True):
        torch.manual_seed(0)
        model = models.build("resnet32", 10).to(cuda).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s % 2 else 0.1)  # the rate changes every step
        step = engine.GraphedTrainStep(model, criterion, opt, "bf16", cuda, batch_size=32, graph=graph)
        g = torch.Generator(device=cuda).manual_seed(1)
        losses_seen = []
        for i in range(10):  # 3 eager warm-up steps, the recording, replays, and a short batch at step 7
            n = 10 if i == 7 else 32
            x = torch.randn(n, 3, 32, 32, device=cuda, generator=g).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (n,), device=cuda, generator=g)
            losses_seen.append(float(step(x, y)[0]))
            sched.step()
        runs.append((torch.cat([p.detach().flatten() for p in model.parameters()]), losses_seen))
    (eager, eager_losses), (replayed, replayed_losses) = runs
    assert float((eager - replayed).norm() / eager.norm()) < 1e-3
    assert eager_losses == pytest.approx(replayed_losses, rel=1e-2)
