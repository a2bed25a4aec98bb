"""The authors' own recipe (configs/official_cifar*.yaml) against their TensorFlow code, google-research's
logit_adjustment/models.py and utils.py: every expected value here is derived from that code's definitions, written
out in this file, not from la's."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO, TINY, run
from la import build, config, data, dist, losses, models

OFFICIAL10 = config.CONFIG_DIR / "official_cifar10.yaml"

# cifar_resnet32's stages (n_layers, n_filters, stride), as its config list gives them
STAGES = [(5, 16, 1), (5, 32, 2), (5, 64, 2)]


def keras_layers(num_classes):
    """cifar_resnet32's weighted layers in order, as (kind, in_channels, out_channels, kernel): every Conv2D (no
    bias), BatchNormalization and the Dense layer of _cifar_resnet, _conv_block and _identity_block."""
    out = [("conv", 3, 16, 3), ("bn", 16, 16, 0)]  # conv1 (after ZeroPadding2D), bn_conv1
    c = 16
    for n_layers, n, _ in STAGES:
        for block in range(n_layers):
            c_in = c if block == 0 else n
            out += [("conv", c_in, n, 1), ("bn", n, n, 0), ("conv", n, n, 3), ("bn", n, n, 0),
                    ("conv", n, n, 1), ("bn", n, n, 0)]           # 2a, 2b, 2c
            if block == 0:
                out += [("conv", c_in, n, 1), ("bn", n, n, 0)]  # the shortcut of _conv_block: branch1
        c = n
    return out + [("bn", 64, 64, 0), ("dense", 64, num_classes, 0)]  # final_bn, fc10


def keras_param_counts(num_classes):
    """(trainable, all) weights of the Keras model: a Conv2D k*k*in*out, a BatchNormalization gamma and beta
    (trainable) and its moving mean and variance (not), the Dense kernel and bias."""
    trainable = total = 0
    for kind, c_in, c_out, k in keras_layers(num_classes):
        w = {"conv": k * k * c_in * c_out, "bn": 2 * c_out, "dense": c_in * c_out + c_out}[kind]
        trainable, total = trainable + w, total + w + (2 * c_out if kind == "bn" else 0)
    return trainable, total


@pytest.mark.parametrize("num_classes", [10, 100])
def test_resnet32_tf_has_the_keras_models_weights_layer_for_layer(num_classes):
    net = models.build("resnet32_tf", num_classes)
    trainable, total = keras_param_counts(num_classes)
    assert (trainable, total) == ((300_762, 304_506) if num_classes == 10 else (306_612, 310_356))
    assert models.num_params(net) == trainable
    buffers = sum(b.numel() for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert models.num_params(net) + buffers == total
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    expected = keras_layers(num_classes)
    assert [(m.in_channels, m.out_channels, m.kernel_size[0]) for m in convs] == \
        [(i, o, k) for kind, i, o, k in expected if kind == "conv"]  # same layers, though not in Keras's order
    assert all(m.bias is None for m in convs) and len(bns) == sum(kind == "bn" for kind, *_ in expected)
    # Keras BatchNormalization(momentum=0.9, epsilon=1e-5): 0.9 of the old statistic kept, so PyTorch's 0.1; on 4-D
    # inputs Keras runs tf.nn.fused_batch_norm, which raises epsilon to 1.001e-5
    assert all(m.momentum == pytest.approx(0.1) and m.eps == 1.001e-5 for m in bns)


@pytest.mark.parametrize("recipe", ["official_cifar10.yaml", "official_cifar100.yaml"])
def test_official_recipes_train_in_float32_as_the_tf_code_does(recipe):
    assert config.build(REPO / "configs" / recipe).train.precision == "fp32"


def keras_training_gflop(num_classes):
    """Forward + backward FLOPs per training image of cifar_resnet32, from its layer list and map sizes (36, 36, 18,
    9; the stride on each stage's first 3x3 and shortcut, so that block's first 1x1 runs at the larger size): a
    convolution 2 k^2 c_in c_out h w forward, as much again for each of its input and weight gradients (the stem has
    no input gradient), the dense layer likewise; batch norm is not counted (nor by FlopCounterMode)."""
    forward = [2 * 9 * 3 * 16 * 36 * 36]
    size, c = 36, 16
    for n_layers, n, stride in STAGES:
        for block in range(n_layers):
            out = size // stride if block == 0 else size
            forward += [2 * c * n * size * size, 2 * 9 * n * n * out * out, 2 * n * n * out * out]
            forward += [2 * c * n * out * out] if block == 0 else []
            size, c = out, n
    return (3 * sum(forward) - forward[0] + 3 * 2 * 64 * num_classes) / 1e9


def test_bench_counts_the_keras_models_flops_fewer_than_resnet32s():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = config.build(OFFICIAL10)
    assert keras_training_gflop(10) == pytest.approx(0.338664192)
    assert bench.gflop_per_image(cfg, 10) == pytest.approx(keras_training_gflop(10), rel=1e-9)
    # bottleneck blocks of one width cost less than He et al.'s two 3x3 convolutions (0.41 GFLOP), despite 36 x 36
    assert bench.gflop_per_image(config.build(), 10) == pytest.approx(0.412, rel=1e-3)


def test_resnet32_tf_initialisation_is_keras_he_normal_and_dense_normal_001():
    torch.manual_seed(0)
    net = models.build("resnet32_tf", 10)
    w = net.layers[14].conv2.weight  # 3x3, 64 -> 64: fan_in 576
    std = (2 / 576) ** 0.5  # he_normal: truncated normal whose deviation, after the cut at 2 sigma, is sqrt(2 / fan_in)
    assert float(w.detach().std()) == pytest.approx(std, rel=0.03)
    assert float(w.detach().abs().max()) <= 2 * std / 0.87962566103423978 + 1e-7
    assert float(net.fc.weight.detach().std()) == pytest.approx(0.01, rel=0.1) and not net.fc.bias.any()


def test_resnet32_tf_map_sizes_and_tensorflow_same_padding():
    net = models.build("resnet32_tf", 10).eval()
    sizes = {}
    for name, module in [("stem", net.bn1), ("stage1", net.layers[4]), ("stage2", net.layers[9]), ("stage3", net.layers[14])]:
        module.register_forward_hook(lambda m, i, o, name=name: sizes.update({name: tuple(o.shape[1:])}))
    net(torch.randn(2, 3, 32, 32))
    # ZeroPadding2D(3): 38, a valid 3x3 convolution: 36; 'same' stride-2 convolutions: ceil(36 / 2), ceil(18 / 2)
    assert sizes == {"stem": (16, 36, 36), "stage1": (16, 36, 36), "stage2": (32, 18, 18), "stage3": (64, 9, 9)}
    # TensorFlow's 'same' pads a stride-2 3x3 convolution of an even map by 0 before and 1 after: output pixel (0, 0)
    # sees input rows and columns 0..2, and the last one sees 34, 35 and a zero
    conv = net.layers[5].conv2  # the stride-2 3x3 convolution of stage 2's first block, 36 -> 18
    x = torch.randn(1, 32, 36, 36)
    with torch.no_grad():
        out = conv(x)
    assert out.shape[-1] == 18
    w = conv.weight[0].detach()
    assert float(out[0, 0, 0, 0]) == pytest.approx(float((x[0, :, 0:3, 0:3] * w).sum()), abs=1e-4)
    last = (x[0, :, 34:36, 34:36] * w[:, :2, :2]).sum()
    assert float(out[0, 0, 17, 17]) == pytest.approx(float(last), abs=1e-4)


def test_weight_decay_is_on_the_tensors_keras_regularises():
    """Keras's l2(1e-4) on every Conv2D kernel and on the Dense kernel and bias adds 1e-4 * sum(w^2) to the loss:
    gradient 2e-4 * w on exactly those tensors, which is SGD's weight decay 2e-4 there and none on batch norm."""
    cfg = config.build(OFFICIAL10)
    net = models.build(cfg.model.name, 10)
    regularised = {id(m.weight) for m in net.modules() if isinstance(m, nn.Conv2d)}
    regularised |= {id(net.fc.weight), id(net.fc.bias)}
    assert len(regularised) == 49 + 2  # 1 stem + 15 x 3 block convolutions + 3 shortcuts; the dense kernel and bias
    opt = build.optimizer(cfg, net)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(decay) == len(list(net.parameters()))
    assert {i for i, wd in decay.items() if wd} == regularised
    assert set(decay.values()) == {0.0, 2e-4}
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"]) == (0.1, 0.9, True)  # main.py's SGD(0.1, momentum=0.9, nesterov)
    # one step with zero gradients moves exactly the decayed tensors, each by lr * 2e-4 * w (the first step's
    # momentum buffer is the gradient itself; Nesterov adds momentum x it)
    before = {id(p): p.detach().clone() for p in net.parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in net.parameters():
        factor = 1 - 0.1 * 2e-4 * 1.9 if id(p) in regularised else 1.0
        assert torch.allclose(p.detach(), before[id(p)] * factor, rtol=1e-6, atol=1e-12)  # the decay is 3.8e-5 of w


def test_default_recipes_decay_every_parameter_in_one_group():
    cfg = config.build()
    opt = build.optimizer(cfg, models.build("resnet32", 10))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 2e-4


def tf_process_image(image_hwc, offset, flip):
    """utils.py _process_image for training, with the random draws given: x * (1 / 255) - 0.5 in float32, then
    resize_with_crop_or_pad to 36 x 36 (2 zeros on each side), the 32 x 32 crop at `offset`, the left-right flip."""
    x = image_hwc.astype(np.float32) * np.float32(1.0 / 255) - np.float32(0.5)
    x = np.pad(x, ((2, 2), (2, 2), (0, 0)))
    x = x[offset[0]:offset[0] + 32, offset[1]:offset[1] + 32]
    return x[:, ::-1] if flip else x


def test_official_inputs_are_scaled_padded_and_cropped_as_the_tf_pipeline(fake_root):
    cfg = config.build(OFFICIAL10, [("data.root", str(fake_root)), ("data.rho", 1.0), ("data.val_per_class", 0)])
    splits = data.prepare(cfg.data)
    ctx = dist.Context(0, 0, 1, torch.device("cpu"))
    cfg.train.batch_size, cfg.train.channels_last = 64, True
    loader = data.make_loader(cfg, splits, ctx)
    x, y = next(loader.batches(0))
    assert x.is_contiguous(memory_format=torch.channels_last)
    offsets, flips = data.augment_params(len(splits.train_y), cfg.train.seed, 0, pad=2)
    assert offsets.min() == 0 and offsets.max() == 4  # random_crop of a 36 x 36 image: 5 positions per axis
    plan = loader.plan(0)[0]
    for i in range(16):
        j = int(plan[i])
        want = tf_process_image(splits.train_x[j].transpose(1, 2, 0), offsets[j].tolist(), bool(flips[j]))
        assert np.array_equal(x[i].permute(1, 2, 0).numpy(), want), i
    # without augmentation (evaluation) only the scaling: exactly x * (1 / 255) - 0.5
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    scaled = data.Normalize(torch.device("cpu"), False, "center")(u8)
    assert torch.equal(scaled, u8.float() * np.float32(1.0 / 255) - 0.5)
    assert float(scaled.min()) == -0.5 and float(scaled.max()) == pytest.approx(0.5)


def test_drop_last_gives_only_full_batches_and_the_default_keeps_the_short_one():
    assert [len(b) for b in data.epoch_plan(103, 16, 1, 0, 0)] == [16] * 6 + [7]
    dropped = data.epoch_plan(103, 16, 1, 0, 0, drop_last=True)
    assert [len(b) for b in dropped] == [16] * 6  # int(103 / 16), as main.py's batches_per_epoch
    assert all(torch.equal(a, b) for a, b in zip(dropped, data.epoch_plan(103, 16, 1, 0, 0)))
    # 12,386 training images (rho = 100 after the validation split) make 96 steps, as the authors' 12,406 do
    assert len(data.epoch_plan(12_386, 128, 1, 0, 0, drop_last=True)) == 96 == int(12_406 / 128)


def test_official_recipe_trains_resumes_and_evaluates_with_its_own_scaling(fake_root, tmp_path):
    """A shortened official recipe end to end: its two parameter groups through a checkpoint and a resume, and
    eval.py scaling the inputs as the run trained (x / 255 - 0.5, from the recorded config)."""
    short = ["--config", OFFICIAL10, *TINY, "--set", "model.name=resnet32_tf", "--data-root", fake_root, "--loss", "la",
             "--set", "optim.warmup_epochs=1", "--set", "optim.milestones=[1]", "--set", "train.batch_size=64",
             "--out", tmp_path / "run"]  # TINY's resnet8 back to the recipe's network
    run([REPO / "train.py", *short, "--epochs", "1"], cwd=tmp_path)
    run([REPO / "train.py", *short, "--epochs", "2", "--resume"], cwd=tmp_path)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and [g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]] == [2e-4, 0.0]
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = ckpt["split_manifest"]["train_size"] // 64  # full batches only
    assert [l["lr"] for l in lines] == pytest.approx([0.1 * (steps - 1) / steps, 0.01])  # warm-up from 0: utils.py
    run([REPO / "eval.py", tmp_path / "run"], cwd=tmp_path)
    cached = torch.load(tmp_path / "run" / "logits.pt", weights_only=True)
    net = models.build("resnet32_tf", 10)
    net.load_state_dict(ckpt["model"])
    net.eval()
    splits = data.prepare(config.from_dict(ckpt["config"]).data)
    with torch.no_grad():
        want = net(torch.as_tensor(splits.test_x).float() / 255 - 0.5)
    assert torch.allclose(cached["splits"]["test"][0], want, atol=1e-4)
    eval_json = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert eval_json["test"]["raw"]["top1"] == pytest.approx(lines[-1]["test_top1"])


@pytest.mark.parametrize("tau", [1.0, 1.5])
def test_la_loss_is_the_tf_codes_to_float_precision(tau):
    """utils.py build_loss_fn: mean softmax cross-entropy of logits + log(base_probs ** tau + 1e-12), base_probs the
    training prior; here tau * log(prior), which the 1e-12 moves by under 1e-9 at CIFAR-10-LT's smallest prior."""
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(64, 10, generator=g) * 3, torch.randint(0, 10, (64,), generator=g)
    z = logits.double().numpy() + np.log((np.array(counts) / sum(counts)) ** tau + 1e-12)
    z = z - z.max(1, keepdims=True)
    tf_loss = float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(64), y.numpy()]))
    ours = float(losses.Criterion("la", counts, tau)(logits, y))
    assert ours == pytest.approx(tf_loss, rel=1e-6)
    assert abs(float(losses.Criterion("ce", counts)(logits, y)) - tf_loss) > 0.1  # the shift matters at this scale
