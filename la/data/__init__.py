"""The data path, one package: two sources and what they share, picked by data.dataset.

    la/data/__init__.py   prepare() and make_loader(): pick the source; the names callers use (la.data.X)
    la/data/cifar.py      CIFAR pickles, long-tailed subset, validation split, tensor and torchvision loaders
    la/data/folder.py     folder and list files (ImageNet-LT, iNaturalist), decoded in DataLoader workers
    la/data/batches.py    shared: epoch plan, rank shards, PlanSampler, Normalize
    la/data/splits.py     shared: Splits (what prepare returns), same_split

Imports run one way: __init__ -> cifar, folder -> batches, splits; no module imports one that imports it back.
"""
from la.data import cifar, folder
from la.data.batches import MEAN, STD, Normalize, Planned, PlanSampler, epoch_generator, epoch_plan, shard
from la.data.cifar import (LAYOUT, PIXEL_KEYS, TensorLoader, TorchvisionLoader, augment_params, carve_validation,
                           class_counts, crop_flip, index_hash, largest_rho, load_cifar, longtail_indices,
                           num_classes, pixel_hash)
from la.data.splits import Splits, same_split

FILE_DATASETS = ("folder", "list")  # image files (la/data/folder.py), not CIFAR pickles


def source(dataset):
    """The module that reads a data.dataset: la.data.folder for image files, la.data.cifar for CIFAR."""
    return folder if dataset in FILE_DATASETS else cifar


def prepare(data_cfg, allow_empty_classes=False):
    """The Splits of the dataset a config's data section names: CIFAR's long-tailed subset and validation split
    (a rho that leaves a class without training images is an error unless allow_empty_classes, for eval.py on runs
    trained before it was), or a folder's or list files' images."""
    if data_cfg.dataset in FILE_DATASETS:
        return folder.prepare(data_cfg)
    return cifar.prepare(data_cfg, allow_empty_classes)


def make_loader(cfg, splits, ctx):
    """The training batches a recipe asks for, this rank's share, on ctx's device."""
    return source(cfg.data.dataset).make_loader(cfg, splits, ctx)
