"""ResNet-32 of He et al. (CIFAR, basic blocks, option-A shortcuts), the ResNet-32 of the paper authors' TensorFlow
code (bottleneck blocks, resnet32_tf) and the seed's ResNet-34 CIFAR variant, with a linear classifier (`fc`) or the
cosine one LDAM trains."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from la import UserError


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Option A of He et al.: a parameter-free shortcut (subsample, zero-pad channels),
        # which is what keeps ResNet-32 at 0.46M parameters.
        self.pad = planes - in_planes if stride != 1 or in_planes != planes else 0
        self.stride = stride

    def shortcut(self, x):
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for stage, planes in enumerate((16, 32, 64)):
            for b in range(blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet32(num_classes):
    return CifarResNet(5, num_classes)


def resnet8(num_classes):
    """The same family's smallest member (one block per stage, 75k parameters): quick checks and the tests."""
    return CifarResNet(1, num_classes)


# ---------------------------------------------------------------- the authors' TensorFlow ResNet-32

def tf_same_padding(size, kernel, stride):
    """(before, after): the zeros TensorFlow's padding='same' adds along one axis of `size`. It makes ceil(size /
    stride) outputs and puts an odd pixel after, so a stride-2 3x3 convolution of an even map is padded (0, 1): its
    windows sit one pixel later than PyTorch's symmetric padding=1 would put them."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class TFConv2d(nn.Conv2d):
    """A bias-free Keras Conv2D: padding 'same' (TensorFlow's rule, tf_same_padding) or 'valid', he_normal
    initialisation (Keras's truncated normal: std sqrt(2 / fan_in) / 0.8796, cut at two of its deviations)."""

    def __init__(self, in_planes, planes, kernel, stride=1, same=True):
        super().__init__(in_planes, planes, kernel, stride, 0, bias=False)
        self.same = same and kernel > 1
        std = (2.0 / (in_planes * kernel * kernel)) ** 0.5 / 0.87962566103423978
        nn.init.trunc_normal_(self.weight, 0.0, std, -2 * std, 2 * std)

    def forward(self, x):
        if self.same:
            (top, bottom), (left, right) = (tf_same_padding(n, self.kernel_size[0], self.stride[0]) for n in x.shape[2:])
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


TF_FUSED_BN_MIN_EPS = 1.001e-5  # tf.nn.fused_batch_norm raises any smaller epsilon to this (cuDNN's floor)


def tf_batch_norm(planes):
    """Keras BatchNormalization(momentum=0.9, epsilon=1e-5) as TensorFlow runs it on 4-D inputs: fused, which raises
    epsilon to 1.001e-5. Keras's momentum is the share of the old running statistic kept, PyTorch's the share of
    the new batch's."""
    return nn.BatchNorm2d(planes, eps=TF_FUSED_BN_MIN_EPS, momentum=0.1)


class TFBottleneck(nn.Module):
    """The Keras ResNet-50 block at one width: 1x1, 3x3 (carrying the stride), 1x1 convolutions, each followed by
    batch norm, ReLU after the first two and after the sum. The first block of a stage (`project`) has a strided
    1x1 convolution + batch norm shortcut, also where neither stride nor width change (the first stage)."""

    def __init__(self, in_planes, planes, stride, project):
        super().__init__()
        self.conv1, self.bn1 = TFConv2d(in_planes, planes, 1), tf_batch_norm(planes)
        self.conv2, self.bn2 = TFConv2d(planes, planes, 3, stride), tf_batch_norm(planes)
        self.conv3, self.bn3 = TFConv2d(planes, planes, 1), tf_batch_norm(planes)
        self.project = project
        if project:
            self.shortcut_conv, self.shortcut_bn = TFConv2d(in_planes, planes, 1, stride, same=False), tf_batch_norm(planes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        shortcut = self.shortcut_bn(self.shortcut_conv(x)) if self.project else x
        return F.relu(self.bn3(self.conv3(out)) + shortcut)


class TFCifarResNet(nn.Module):
    """cifar_resnet32 of the authors' logit_adjustment/models.py: zero-pad 3, a valid 3x3 convolution (32 -> 36
    pixels), batch norm, ReLU; three stages of bottleneck blocks at widths 16, 32, 64 and strides 1, 2, 2 (36, 18, 9
    pixels); a last batch norm without ReLU; global average pooling; a dense layer initialised N(0, 0.01), bias 0."""

    def __init__(self, blocks_per_stage, num_classes):
        super().__init__()
        self.conv1, self.bn1 = TFConv2d(3, 16, 3, same=False), tf_batch_norm(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(blocks_per_stage):
                layers.append(TFBottleneck(in_planes, planes, stride if b == 0 else 1, project=b == 0))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.final_bn = tf_batch_norm(64)
        self.fc = nn.Linear(64, num_classes)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(F.pad(x, (3, 3, 3, 3)))))
        x = self.final_bn(self.layers(x))
        return self.fc(x.mean((2, 3)))


def resnet32_tf(num_classes):
    return TFCifarResNet(5, num_classes)


def resnet34_cifar(num_classes):
    """torchvision's resnet34 with a 3x3 stride-1 stem and no max-pool, as mmpretrain's ResNet_CIFAR."""
    import torchvision  # here: importing it costs every process two seconds, and only ResNet-34 needs it

    model = torchvision.models.resnet34(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def resnet50(num_classes):
    """torchvision's ResNet-50 as it is (7x7 stride-2 stem, max-pool), for 224 x 224 images."""
    import torchvision

    return torchvision.models.resnet50(num_classes=num_classes)


MODELS = {"resnet8": resnet8, "resnet32": resnet32, "resnet32_tf": resnet32_tf, "resnet34": resnet34_cifar,
          "resnet50": resnet50}


class CosineClassifier(nn.Module):
    """Logits scale * cos(phi(x), w_y), no bias: the normalised head LDAM trains (LDAM-DRW's NormedLinear with
    its scale s folded in, so the logits are the ones its loss sees)."""

    def __init__(self, in_features, num_classes, scale):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_normal_(self.weight)
        self.scale = scale

    def forward(self, x):
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


def group_sizes(n, group):
    """The sizes of the runs of images GroupBatchNorm2d normalises together in a batch of n: ceil(n / group) groups
    as even as possible, the larger first (98 images, group 16: 7 x 14)."""
    k = max(1, -(-n // group))
    q, r = divmod(n, k)
    return [q + 1] * r + [q] * (k - r)


class GroupBatchNorm2d(nn.BatchNorm2d):
    """Batch norm that, in training, normalises each run of `group` images of the batch by its own statistics.

    This is what plain batch norm does in a DistributedDataParallel job of N processes with `group` images
    each (no SyncBN): mmpretrain's 8 x 16 recipes normalise over 16 images, not 128, and small-batch statistics
    act as a regulariser. As there, the running statistics follow one group (rank 0's, which DDP broadcasts);
    evaluation uses them as usual. The parameters and buffers are batch norm's own, so checkpoints load into a
    plain model.

    The G whole groups go through one batch-norm call, as G x C channels of a batch of `group` images (one
    copy in, one out, in the input's memory format); one call per group instead costs 7.6x the step in
    channels_last on a CPU. A batch that is not a multiple of `group` (an epoch's short last batch: 98 images
    in the seed recipe) is cut into ceil(n / group) groups as even as possible (98: 7 x 14), each of at least
    half the group, as DDP's ranks share a short batch evenly, rather than into whole groups and a remainder
    (6 x 16 and 2 images normalised on their own).
    """

    def __init__(self, num_features, group):
        super().__init__(num_features)
        self.group = group

    def forward(self, x):
        n = x.shape[0]
        if not self.training or n <= self.group:
            return super().forward(x)
        sizes = group_sizes(n, self.group)
        q, r = sizes[-1], sizes.count(sizes[-1] + 1)  # r groups of q + 1 images, then the rest of q
        if r == 0:
            return self._equal_groups(x, q)
        return torch.cat([self._equal_groups(x[:r * (q + 1)], q + 1), self._equal_groups(x[r * (q + 1):], q, track=False)])

    def _equal_groups(self, x, g, track=True):
        """Groups of g images in one batch-norm call; with track, the running statistics follow the first."""
        (n, c, h, w) = x.shape
        k = n // g
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        if channels_last:  # memory (n, h, w, c) -> (g, h, w, k * c), i.e. (g, k * c, h, w) in channels_last
            xt = x.permute(0, 2, 3, 1).reshape(k, g, h, w, c).permute(1, 2, 3, 0, 4).reshape(g, h, w, k * c).permute(0, 3, 1, 2)
        else:
            xt = x.reshape(k, g, c, h, w).transpose(0, 1).reshape(g, k * c, h, w)
        # every group gets the running statistics; only the first group's update is kept
        mean, var = self.running_mean.repeat(k), self.running_var.repeat(k)
        if track:
            self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        y = F.batch_norm(xt, mean, var, self.weight.repeat(k), self.bias.repeat(k), True, factor if track else 0.0, self.eps)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(mean[:c])
                self.running_var.copy_(var[:c])
        if channels_last:
            return y.permute(0, 2, 3, 1).reshape(g, h, w, k, c).permute(3, 0, 1, 2, 4).reshape(n, h, w, c).permute(0, 3, 1, 2)
        return y.reshape(g, k, c, h, w).transpose(0, 1).reshape(n, c, h, w)


def use_group_batch_norm(model, group):
    """Replace every BatchNorm2d of the model by a GroupBatchNorm2d holding the same tensors."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            grouped = GroupBatchNorm2d(child.num_features, group)
            grouped.eps, grouped.momentum = child.eps, child.momentum
            grouped.load_state_dict(child.state_dict())
            setattr(model, name, grouped)
        else:
            use_group_batch_norm(child, group)
    return model


def build(name, num_classes, bn_batch=0, cosine_scale=None):
    """The named network; bn_batch > 0 normalises groups of that many training images (GroupBatchNorm2d);
    cosine_scale replaces the linear classifier by a CosineClassifier of that scale."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    model = MODELS[name](num_classes)
    if cosine_scale is not None:
        model.fc = CosineClassifier(model.fc.in_features, num_classes, cosine_scale)
    return use_group_batch_norm(model, bn_batch) if bn_batch else model


def from_config(cfg, num_classes, training=True):
    """The network a recipe trains: LDAM's cosine classifier with --loss ldam; batch-norm groups only in training
    (they change nothing in evaluation, and the weights are plain batch norm's)."""
    cosine = cfg.loss.ldam_scale if cfg.loss.name == "ldam" else None
    return build(cfg.model.name, num_classes, cfg.model.bn_batch if training else 0, cosine)


def num_params(model):
    return sum(p.numel() for p in model.parameters())
