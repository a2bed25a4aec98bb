"""Recipes: typed defaults, a YAML file on top, then CLI flags, then --set dotted.key=value.

Every key reaches the code; an unknown key, a value of the wrong type or one out of range is a UserError, and so is a
CIFAR-only key set for a folder or list dataset (CIFAR_ONLY).
"""
import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from la import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "paper_cifar10.yaml"


@dataclass
class Data:
    dataset: str = "cifar10"        # cifar10 | cifar100 | folder (ROOT/train, test, val/<class>/) | list (list files)
    root: str = "./data"            # overridden by $LA_DATA_ROOT, then --data-root
    train_list: str = ""            # list: 'relative/path label' lines or an iNaturalist JSON, relative to root
    val_list: str = ""              # list: optional; without it a validation split is carved from training
    test_list: str = ""
    image_size: int = 224           # folder/list: RandomResizedCrop size in training; resize / 0.875 + centre crop in eval
    download: bool = True           # CIFAR: fetch with torchvision's downloader when absent (folder/list: unused)
    profile: str = "exp"            # exp | step (CIFAR only, as rho, loader and crop_pad: CIFAR_ONLY)
    rho: float = 100.0              # imbalance ratio n_max / n_min, >= 1
    subset_seed: int = 0            # LDAM-DRW's rand_number: which images form the subset
    val_per_class: int = 20         # balanced validation split from the unused images (folder/list: from training,
                                    # at most half a class); 0 disables
    loader: str = "tensor"          # tensor (uint8 on device, batched aug) | torchvision (reference)
    workers: int = 2                # DataLoader workers: torchvision loader, folder and list datasets
    augment: bool = True            # random crop (padded by crop_pad) + horizontal flip
    crop_pad: int = 4               # pixels of padding on each side before the random 32x32 crop (the authors' TF code: 2)
    normalize: str = "mean_std"     # mean_std: CIFAR's (folder/list: ImageNet's) per-channel mean and std, padding
                                    # black pixels | center: x/255 - 0.5, padding zeros of the scaled image, as the
                                    # authors' TF code scales before it pads
    drop_last: bool = False         # drop each epoch's short last batch (the authors' TF code: drop_remainder)


@dataclass
class Model:
    name: str = "resnet32"          # resnet32 | resnet32_tf (the authors' TF code's bottleneck ResNet-32) | resnet34
                                    # (CIFAR variant) | resnet50 (torchvision's, ImageNet stem) | resnet8 (the same
                                    # CIFAR family as resnet32, one block per stage: quick checks and the tests)
    bn_batch: int = 0               # images per batch-norm group in training; 0: each process's whole batch.
                                    # 16 normalises as 8 GPUs x 16 without SyncBN do (the seed's 8 x 16), on one device


@dataclass
class Loss:
    name: str = "ce"                # ce | la | ldam
    tau: float = 1.0                # temperature of the log-prior shift in the la loss
    drw: bool = False               # deferred re-weighting: class-balanced loss weights from drw_epoch on
    drw_epoch: int = 160            # first re-weighted epoch, counted from 0 (LDAM-DRW's 160 of 200)
    drw_beta: float = 0.9999        # class-balanced weights (1 - beta) / (1 - beta^n_y)
    ldam_max_margin: float = 0.5    # ldam: the rarest class's margin; the others scale as n_y^(-1/4)
    ldam_scale: float = 30.0        # ldam: logits are ldam_scale * cosine(features, class weights)


@dataclass
class Optim:
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    decay_params: str = "*"         # which parameters weight_decay applies to: names (fnmatch patterns, space-separated)
                                    # of the model's parameters; each must match one. "*": all of them
    nesterov: bool = False
    warmup_epochs: int = 5          # linear warm-up to lr over this many epochs
    warmup_by: str = "step"         # step: lr (s+1)/N at step s of N warm-up steps | epoch: lr (e+1)/W through epoch e,
                                    # as LDAM-DRW's cifar_train.py | step_from_zero: lr s/N, as the authors' TF code
    schedule: str = "step"          # after warm-up: step (x gamma at each of milestones) | cosine (to 0 at train.epochs)
    milestones: list = field(default_factory=lambda: [160, 180])
    gamma: float = 0.1


@dataclass
class Train:
    epochs: int = 200
    batch_size: int = 128           # global batch, split evenly over ranks
    seed: int = 0                   # initialisation, data order and augmentation
    precision: str = "auto"         # auto | fp32 | bf16
    channels_last: bool = True
    compile: str = "auto"           # auto (on for CPUs with a C++ compiler, off on CUDA) | true | false
    compile_mode: str = "default"   # torch.compile's mode; reduce-overhead replays steps as CUDA graphs
    cuda_graph: str = "auto"        # auto (on for one uncompiled CUDA process) | true | false: replay the step as a CUDA graph
    eval_every: int = 1             # evaluate every N epochs (and always after the last)
    save_every: int = 1             # checkpoint every N epochs (and after the last, and on a stop signal)
    eval_batch_size: int = 1024
    out: str = ""                   # run directory; empty means runs/{dataset}-lt_rho{rho}_{loss}_s{seed}


@dataclass
class Config:
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    loss: Loss = field(default_factory=Loss)
    optim: Optim = field(default_factory=Optim)
    train: Train = field(default_factory=Train)


# CLI flag -> dotted key; flags are shorthands for --set.
FLAG_KEYS = {
    "dataset": "data.dataset",
    "rho": "data.rho",
    "data_root": "data.root",
    "loss": "loss.name",
    "tau": "loss.tau",
    "epochs": "train.epochs",
    "seed": "train.seed",
    "out": "train.out",
}

CHOICES = {
    "data.dataset": ("cifar10", "cifar100", "folder", "list"),
    "data.profile": ("exp", "step"),
    "data.loader": ("tensor", "torchvision"),
    "data.normalize": ("mean_std", "center"),
    "model.name": ("resnet8", "resnet32", "resnet32_tf", "resnet34", "resnet50"),
    "loss.name": ("ce", "la", "ldam"),
    "optim.warmup_by": ("step", "epoch", "step_from_zero"),
    "optim.schedule": ("step", "cosine"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.compile": ("auto", "true", "false"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "train.cuda_graph": ("auto", "true", "false"),
}


def _coerce(key, value, default):
    """Convert value to the type of the field's default; strings from the CLI are parsed as YAML."""
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"{key}: cannot parse {value!r}")
    kind = type(default)
    if kind is str and isinstance(value, bool):
        value = "true" if value else "false"  # YAML's true/false for a key that also takes 'auto'
    if kind is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 1e30 and 5e-4 (no dot) as strings
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is list and isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    if type(value) is not kind or kind is list:
        want = "list of integers" if kind is list else kind.__name__
        raise UserError(f"{key}: expected {want}, got {value!r}")
    return value


def set_key(cfg, key, value):
    parts = key.split(".")
    if len(parts) != 2 or not hasattr(cfg, parts[0]) or not hasattr(getattr(cfg, parts[0]), parts[1]):
        raise UserError(f"unknown config key {key!r}")
    section = getattr(cfg, parts[0])
    setattr(section, parts[1], _coerce(key, value, getattr(section, parts[1])))


def flatten(tree, prefix=""):
    if not isinstance(tree, dict):
        raise UserError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping")
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def load_yaml(path):
    try:
        with open(path) as f:
            tree = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}")
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}")
    return dict(flatten(tree))


def validate(cfg):
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise UserError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    for key, value in flatten(to_dict(cfg)):
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value}")
    # numpy's RandomState takes seeds below 2**32, and the validation split draws with data.subset_seed + 1_000_003
    optim, max_seed = cfg.optim, 2 ** 31 - 1
    checks = [
        (cfg.data.rho >= 1, "data.rho must be >= 1"),
        (0 <= cfg.data.subset_seed <= max_seed, f"data.subset_seed must be in 0..{max_seed}"),
        (cfg.data.val_per_class >= 0, "data.val_per_class must be >= 0"),
        (cfg.data.workers >= 0, "data.workers must be >= 0"),
        (0 <= cfg.data.crop_pad <= 16, "data.crop_pad must be in 0..16"),
        (cfg.data.image_size >= 8, "data.image_size must be >= 8"),
        (cfg.model.bn_batch >= 0, "model.bn_batch must be >= 0 (0: the whole batch)"),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.eval_batch_size >= 1, "train.eval_batch_size must be >= 1"),
        (cfg.train.eval_every >= 1, "train.eval_every must be >= 1"),
        (cfg.train.save_every >= 1, "train.save_every must be >= 1"),
        (0 <= cfg.train.seed <= max_seed, f"train.seed must be in 0..{max_seed}"),
        (cfg.loss.drw_epoch >= 0, "loss.drw_epoch must be >= 0"),
        (0 <= cfg.loss.drw_beta < 1, "loss.drw_beta must be in [0, 1)"),
        (cfg.loss.ldam_max_margin >= 0, "loss.ldam_max_margin must be >= 0"),
        (cfg.loss.ldam_scale > 0, "loss.ldam_scale must be > 0"),
        (optim.lr > 0, "optim.lr must be > 0"),
        (0 <= optim.momentum < 1, "optim.momentum must be in [0, 1)"),
        (optim.momentum > 0 or not optim.nesterov, "optim.nesterov=true needs optim.momentum > 0"),
        (optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (bool(optim.decay_params.split()), "optim.decay_params must name at least one pattern ('*': every parameter)"),
        (optim.gamma > 0, "optim.gamma must be > 0"),
        (optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
        (optim.milestones == sorted(set(optim.milestones)) and min(optim.milestones, default=0) >= 0,
         f"optim.milestones must be increasing epochs >= 0, got {optim.milestones}"),
        (optim.schedule == "step" or not optim.milestones,
         f"optim.milestones {optim.milestones} are for optim.schedule=step; with cosine pass optim.milestones=[]"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


# Keys that shape CIFAR's pipeline alone: set to anything but their default with --dataset folder or list, they are
# refused rather than silently ignored (data.normalize, data.drop_last and data.augment apply to every dataset).
CIFAR_ONLY = {
    "rho": "it shapes CIFAR's long-tailed subset; a folder or list dataset is taken as it is",
    "profile": "it shapes CIFAR's long-tailed subset; a folder or list dataset is taken as it is",
    "crop_pad": "folder and list images get RandomResizedCrop to data.image_size, not a padded 32 x 32 crop",
    "loader": "folder and list images are always decoded in DataLoader workers (data.workers sets how many)",
}


def check_applies(cfg):
    """A CIFAR-only key set for a folder or list dataset is one line, not a key that silently does nothing."""
    if cfg.data.dataset not in ("folder", "list"):
        return
    for key, why in CIFAR_ONLY.items():
        value, default = getattr(cfg.data, key), getattr(Data(), key)
        if value != default:
            raise UserError(f"data.{key}={value!r} does not apply to --dataset {cfg.data.dataset}: {why}; leave it "
                            f"at its default ({default!r})")


def data_root(flag=None, recorded="./data"):
    """Where the data is, the one rule every entry point follows: --data-root, else $LA_DATA_ROOT, else the
    recipe's data.root (for eval.py, the one the run recorded)."""
    return flag or os.environ.get("LA_DATA_ROOT") or recorded


def build(config_path=None, overrides=()):
    """Defaults <- YAML <- $LA_DATA_ROOT <- overrides (a list of (dotted key, value); --data-root is one)."""
    cfg = Config()
    for key, value in load_yaml(config_path or DEFAULT_CONFIG).items():
        set_key(cfg, key, value)
    cfg.data.root = data_root(None, cfg.data.root)
    for key, value in overrides:
        set_key(cfg, key, value)
    validate(cfg)
    check_applies(cfg)  # here, not in validate: a run recorded before it was refused still evaluates
    return cfg


def parse_set(items):
    pairs = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), value))
    return pairs


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def from_dict(tree):
    cfg = Config()
    for key, value in flatten(tree):
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


def format_rho(rho):
    return f"{rho:g}"


def default_run_dir(cfg):
    if cfg.data.dataset in ("folder", "list"):
        return Path("runs") / f"{Path(cfg.data.root).name or cfg.data.dataset}_{method_name(cfg.loss)}_s{cfg.train.seed}"
    return Path("runs") / f"{cfg.data.dataset}-lt_rho{format_rho(cfg.data.rho)}_{method_name(cfg.loss)}_s{cfg.train.seed}"


def method_name(loss_cfg):
    """ce, la, ldam, with -drw when deferred re-weighting is on: how run directories and tables name a method."""
    return loss_cfg.name + ("-drw" if loss_cfg.drw else "")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UserError (one line) instead of usage text and exit."""

    def error(self, message):
        raise UserError(message)


def add_recipe_flags(parser):
    parser.add_argument("--config", help=f"recipe YAML (default {DEFAULT_CONFIG.relative_to(CONFIG_DIR.parent)})")
    for flag, key in FLAG_KEYS.items():
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, metavar="VALUE", help=f"sets {key}")
    parser.add_argument("--drw", action="store_true", help="sets loss.drw=true (deferred re-weighting)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any recipe key")


def from_args(args):
    overrides = [(FLAG_KEYS[f], getattr(args, f)) for f in FLAG_KEYS if getattr(args, f) is not None]
    overrides += [("loss.drw", True)] if args.drw else []
    return build(args.config, overrides + parse_set(args.set))
