"""model.bn_batch: batch norm over groups of images, as plain batch norm on several GPUs computes it."""
import pytest
import torch
from torch import nn

from la import models


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_group_batch_norm_normalises_each_group_and_tracks_the_first(memory_format):
    torch.manual_seed(0)
    # groups of 4 and a batch of 10, as an epoch's short last batch: cut as evenly as possible, 4, 3, 3, never
    # into 4, 4 and a group of 2 (half the group at the least), as DDP's ranks would share it evenly
    x = torch.randn(10, 3, 4, 5) * 3 + 1
    x = x.contiguous(memory_format=memory_format)
    plain = nn.BatchNorm2d(3)
    nn.init.uniform_(plain.weight), nn.init.uniform_(plain.bias)
    grouped = models.use_group_batch_norm(nn.Sequential(plain), 4)[0]
    assert isinstance(grouped, models.GroupBatchNorm2d) and torch.equal(grouped.weight, plain.weight)

    out = grouped(x)
    per_group = [nn.BatchNorm2d(3) for _ in range(3)]
    expected = []
    for bn, chunk in zip(per_group, x.split([4, 3, 3])):
        bn.load_state_dict(plain.state_dict())
        expected.append(bn(chunk))
    assert torch.allclose(out, torch.cat(expected), atol=1e-6)
    out.backward(torch.arange(out.numel(), dtype=torch.float).view_as(out).sin())  # gradients too
    torch.cat(expected).backward(torch.arange(out.numel(), dtype=torch.float).view_as(out).sin())
    assert torch.allclose(grouped.weight.grad, sum(bn.weight.grad for bn in per_group), atol=1e-5)
    # like rank 0 of a DDP job: the running statistics saw the first group only, once
    assert torch.allclose(grouped.running_mean, per_group[0].running_mean)
    assert torch.allclose(grouped.running_var, per_group[0].running_var)
    assert int(grouped.num_batches_tracked) == 1
    # whole-batch statistics would differ: the test can tell the two apart
    assert not torch.allclose(out, nn.BatchNorm2d(3).train()(x) * plain.weight.view(1, 3, 1, 1) + plain.bias.view(1, 3, 1, 1), atol=1e-3)

    grouped.eval()  # evaluation is plain batch norm on the running statistics
    per_group[0].eval()
    assert torch.allclose(grouped(x), per_group[0](x), atol=1e-6)


def test_group_batch_norm_over_the_whole_batch_is_plain_batch_norm_and_checkpoints_load_plainly():
    torch.manual_seed(0)
    plain = models.build("resnet32", 10)
    torch.manual_seed(0)
    grouped = models.build("resnet32", 10, bn_batch=16)
    assert sum(isinstance(m, models.GroupBatchNorm2d) for m in grouped.modules()) == 31
    assert grouped.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(16, 3, 32, 32)
    assert torch.equal(grouped.train()(x), plain.train()(x))  # a batch no larger than the group: one group
    fresh = models.build("resnet32", 10)
    fresh.load_state_dict(grouped.state_dict())  # eval.py builds the plain network
    assert torch.equal(fresh.eval()(x), grouped.eval()(x))


@pytest.mark.parametrize("name, depth, params", [("resnet32", 32, 464_154), ("resnet8", 8, 75_290)])
def test_cifar_resnets_are_the_6n_plus_2_family(name, depth, params):
    """He et al.'s CIFAR ResNets: 6n + 2 weighted layers (n = 5 for ResNet-32, 1 for ResNet-8, the tests' network),
    16-32-64 channels, 10 classes; the parameter count pins the widths."""
    net = models.build(name, 10)
    weighted = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == depth and models.num_params(net) == params
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
