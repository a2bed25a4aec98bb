"""The CIFAR source: its python pickles, the long-tailed subset, the validation split, and its two training loaders
(tensor ops on the device, or torchvision's PIL transforms in DataLoader workers).

The subset follows kaidic/LDAM-DRW's IMBALANCECIFAR exactly (same counts, same images for
the same seed), so numbers here are comparable with the PyTorch long-tail literature.
"""
import hashlib
import math
import pickle
from pathlib import Path

import numpy as np
import torch

from la import UserError
from la.data.batches import MEAN, STD, Normalize, Planned, PlanSampler, epoch_generator, shard
from la.data.splits import Splits

LAYOUT = {
    # dataset: (folder, train files, test files, label key, classes, torchvision class name)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10, "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100, "CIFAR100"),
}


def num_classes(dataset):
    return LAYOUT[dataset][4]


# ---------------------------------------------------------------- loading

class _Refused(pickle.UnpicklingError):
    """A CIFAR file asked to import something the format never holds."""


def _latin1_bytes(text, encoding="latin1"):
    """What a protocol-2 pickle written by Python 3 calls as _codecs.encode(text, 'latin1') to rebuild bytes (an
    array's data): that one encoding and nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise _Refused(f"_codecs.encode with {type(text).__name__}, {encoding!r}")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """Rebuilds only what the CIFAR python format holds: dicts, lists, strings, bytes, numbers and numpy arrays.

    A pickle rebuilds objects by importing and calling what it names; a planted file could name os.system.
    Here the only names are numpy's array reconstructors (protocols 0-4, and 5's from a buffer; under numpy 1's
    and numpy 2's module names), ndarray and dtype: each builds an array from bytes and nothing else; and, for
    protocol 2 written by Python 3 (the packed copy's unpack.py writes it), _codecs.encode of a string as latin-1.
    """
    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_bytes}
    for core in ("core", "_core"):
        ALLOWED[f"numpy.{core}.multiarray", "_reconstruct"] = np.empty(0).__reduce__()[0]
        ALLOWED[f"numpy.{core}.numeric", "_frombuffer"] = np.empty(0).__reduce_ex__(5)[0]
    del core

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"{module}.{name}")
        return self.ALLOWED[module, name]


def _read_batch(path, label_key, n_classes):
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="latin1").load()  # latin1: the original files are Python 2 pickles
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[label_key], dtype=np.int64)
    except FileNotFoundError:
        raise
    except _Refused as e:
        raise UserError(f"CIFAR file {path} was not loaded: it asks to import {e}, which the CIFAR format never "
                        f"holds, and unpickling it could run code")
    except Exception as e:  # truncated, not a pickle, wrong keys or shape
        raise UserError(f"corrupt CIFAR file {path}: {type(e).__name__}: {e}")
    if len(x) != len(y):
        raise UserError(f"corrupt CIFAR file {path}: {len(x)} images but {len(y)} labels")
    bad = np.flatnonzero((y < 0) | (y >= n_classes))
    if len(bad):
        raise UserError(f"corrupt CIFAR file {path}: image {bad[0]} has label {y[bad[0]]}, outside 0..{n_classes - 1}"
                        + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    return x, y


def _download(root, dataset):
    """Fetch and unpack the archive (checked against its MD5) with torchvision's helper; _read_batch reads it."""
    import torchvision  # only needed here

    source = getattr(torchvision.datasets, LAYOUT[dataset][5])
    try:
        torchvision.datasets.utils.download_and_extract_archive(source.url, root, filename=source.filename, md5=source.tgz_md5)
    except Exception as e:
        raise UserError(
            f"{dataset} not found under {Path(root).resolve()} and download failed ({type(e).__name__}); "
            f"put the python-pickle folder {LAYOUT[dataset][0]}/ there or pass --data-root"
        )


def load_cifar(root, dataset, download=False):
    """Return (train_x, train_y, test_x, test_y): uint8 N x 3 x 32 x 32 and int64 labels, original order."""
    folder, train_files, test_files, label_key, n_classes, _ = LAYOUT[dataset]
    base = Path(root) / folder
    missing = [n for n in train_files + test_files if not (base / n).is_file()]
    if missing and download:
        _download(root, dataset)
        missing = [n for n in train_files + test_files if not (base / n).is_file()]
    if missing:
        raise UserError(
            f"{dataset} not found: {base.resolve()} lacks {', '.join(missing)}; "
            f"put the python-pickle files there, pass --data-root, or set data.download=true with network"
        )
    parts = {}
    for split, names in (("train", train_files), ("test", test_files)):
        xs, ys = zip(*(_read_batch(base / n, label_key, n_classes) for n in names))
        parts[split] = (np.concatenate(xs), np.concatenate(ys))
    return parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1]


# ---------------------------------------------------------------- long-tailed subset

def class_counts(n_classes, n_max, rho, profile="exp"):
    """Images per class, class 0 the head: LDAM-DRW's get_img_num_per_cls with imb_factor = 1/rho. profile is
    'exp' or 'step' (la.config refuses any other)."""
    if profile == "step":
        head = n_classes // 2
        return [int(n_max)] * head + [int(n_max * (1.0 / rho))] * (n_classes - head)
    return [int(n_max * (1.0 / rho) ** (i / (n_classes - 1.0))) for i in range(n_classes)]


def largest_rho(n_max):
    """The largest rho at which the tail class (class_counts's int(n_max * (1 / rho))) keeps an image.

    In exact arithmetic that is n_max; in floating point it can be a hair below (49 * (1 / 49) < 1).
    """
    keeps = lambda rho: int(n_max * (1.0 / rho)) >= 1
    rho = float(n_max)
    while not keeps(rho):
        rho = math.nextafter(rho, 0)
    while keeps(math.nextafter(rho, math.inf)):
        rho = math.nextafter(rho, math.inf)
    return rho


def longtail_indices(labels, counts, seed):
    """Per class in order: shuffle that class's indices with a local RandomState, keep the first n_i."""
    rng = np.random.RandomState(seed)
    keep = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        keep.append(idx[:n])
    return np.concatenate(keep)


def carve_validation(labels, train_idx, per_class, seed):
    """A balanced split of per_class images per class, disjoint from training. Returns (train_idx, val_idx).

    Images come from the training images the subset left out. A head class kept whole
    (class 0 at rho > 1, every class at rho = 1) has none left out: its shortfall is moved
    out of the end of its training images (20 of 5,000 by default), and the manifest says so.
    """
    if per_class == 0:
        return train_idx, np.zeros(0, dtype=np.int64)
    unused = np.ones(len(labels), dtype=bool)
    unused[train_idx] = False
    rng = np.random.RandomState(seed + 1_000_003)  # its own stream, independent of the subset's
    picks, moved = [], []
    for c in range(int(labels.max()) + 1):
        pool = np.where(unused & (labels == c))[0]
        take = rng.choice(pool, min(per_class, len(pool)), replace=False)
        short = per_class - len(take)
        if short:
            own = train_idx[labels[train_idx] == c]
            if short > len(own) // 2:
                raise UserError(f"val_per_class={per_class} is larger than class {c}'s unused pool ({len(pool)} images) "
                                f"plus half of its {len(own)} training images")
            take = np.concatenate([take, own[len(own) - short:]])
            moved.append(own[len(own) - short:])
        picks.append(np.sort(take))
    if moved:
        train_idx = train_idx[~np.isin(train_idx, np.concatenate(moved))]
    return train_idx, np.concatenate(picks)


def index_hash(idx):
    return hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()[:16]


def pixel_hash(x):
    """The images themselves (uint8 N x 3 x 32 x 32): the indices come from the labels alone, so only this tells
    other or corrupt pixels apart (about 0.1 s for CIFAR's 60,000 images)."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.uint8).tobytes()).hexdigest()[:16]


PIXEL_KEYS = ("train_pixels_sha256", "val_pixels_sha256", "test_pixels_sha256")


def prepare(data_cfg, allow_empty_classes=False):
    """Load the CIFAR dataset named by a config's data section and carve the long-tailed and validation splits.

    A rho that leaves a class without training images is an error, unless allow_empty_classes (eval.py, for runs
    trained before it was).
    """
    x, y, test_x, test_y = load_cifar(data_cfg.root, data_cfg.dataset, data_cfg.download)
    n_classes = num_classes(data_cfg.dataset)
    n_max = len(y) // n_classes
    subset_counts = class_counts(n_classes, n_max, data_cfg.rho, data_cfg.profile)
    empty = [c for c, n in enumerate(subset_counts) if n == 0]
    if empty and not allow_empty_classes:  # its log-prior would be -inf: the LA loss and post-hoc adjustment break on it
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise UserError(f"data.rho={data_cfg.rho:g} leaves class {empty[0]}{more} of {data_cfg.dataset} without a "
                        f"training image ({n_max} per class); the largest rho it allows is {largest_rho(n_max):.17g}")
    train_idx = longtail_indices(y, subset_counts, data_cfg.subset_seed)
    train_idx, val_idx = carve_validation(y, train_idx, data_cfg.val_per_class, data_cfg.subset_seed)
    counts = np.bincount(y[train_idx], minlength=n_classes).tolist()
    manifest = {
        "dataset": data_cfg.dataset,
        "profile": data_cfg.profile,
        "rho": data_cfg.rho,
        "subset_seed": data_cfg.subset_seed,
        "subset_counts": subset_counts,
        "class_counts": counts,
        "moved_to_val": [a - b for a, b in zip(subset_counts, counts)],
        "train_size": int(len(train_idx)),
        "train_index_sha256": index_hash(train_idx),
        "val_per_class": data_cfg.val_per_class,
        "val_size": int(len(val_idx)),
        "val_index_sha256": index_hash(val_idx),
        "test_size": int(len(test_y)),
        **dict(zip(PIXEL_KEYS, (pixel_hash(x[train_idx]), pixel_hash(x[val_idx]), pixel_hash(test_x)))),
    }
    return Splits(x[train_idx], y[train_idx], x[val_idx], y[val_idx], test_x, test_y, counts, manifest)


# ---------------------------------------------------------------- training loaders

def augment_params(n, seed, epoch, pad=4):
    """Crop offsets in 0..2 pad (torchvision's RandomCrop(32, padding=pad): 0..8 at the usual 4) and flips, one per
    training image."""
    g = epoch_generator(seed, epoch)
    g.manual_seed(g.initial_seed() ^ 0x5EED)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    return offsets, flips


def crop_flip(x, offsets, flips, pad=4):
    """Random crop of the zero-padded (by pad on each side) batch and horizontal flip of an N x 3 x 32 x 32 batch,
    as tensor ops."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    ar = torch.arange(32, device=x.device)
    rows = (offsets[:, 0:1] + ar)[:, None, :, None]
    cols = offsets[:, 1:2] + ar
    cols = torch.where(flips[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(3, device=x.device)[None, :, None, None], rows, cols]


class TensorLoader(Planned):
    """The training set as one uint8 tensor on the device; each epoch a seeded, rank-sharded plan.

    Batches for epoch e are a pure function of (seed, e), so a run resumed mid-epoch sees
    exactly the batches it would have seen.
    """

    def __init__(self, x, y, batch_size, rank, world_size, seed, device, channels_last, augment=True, crop_pad=4,
                 normalize="mean_std", drop_last=False):
        self.x = torch.as_tensor(x).to(device)
        self.y = torch.as_tensor(y).to(device)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.n, self.augment, self.crop_pad, self.drop_last = len(y), augment, crop_pad, drop_last
        self.normalize = Normalize(device, channels_last, normalize)

    def batches(self, epoch, start_step=0):
        plan = self.plan(epoch)[start_step:]
        device = self.x.device
        offsets, flips = (t.to(device) for t in augment_params(self.n, self.seed, epoch, self.crop_pad))
        # the epoch's indices reach the device in one copy: a copy per batch from pageable memory would
        # make the host wait for the GPU at every step
        mine = [shard(batch, self.rank, self.world_size) for batch in plan]
        if not mine:
            return
        for idx in torch.cat(mine).to(device).split([len(m) for m in mine]):
            x, norm = self.x[idx], self.normalize
            if not self.augment:
                yield norm(x), self.y[idx]
            elif norm.scales_first:
                yield crop_flip(norm(x), offsets[idx], flips[idx], self.crop_pad).contiguous(
                    memory_format=norm.memory_format), self.y[idx]
            else:
                yield norm(crop_flip(x, offsets[idx], flips[idx], self.crop_pad)), self.y[idx]


class _ArrayDataset(torch.utils.data.Dataset):
    """torchvision's crop (padded by `pad`) and flip of image i in epoch e at augment_params(n, seed, e, pad)[i], the
    tensor loader's own draw: keyed to (seed, epoch, index), so neither the worker count nor a mid-epoch resume
    changes a batch. Padding adds zeros: black pixels, or with normalize='center' (scaled first, as the authors' TF
    code does) mid-grey ones, as the tensor loader pads."""

    def __init__(self, x, y, seed, augment, pad=4, normalize="mean_std"):
        self.x, self.y, self.seed, self.augment, self.pad, self.normalize = x, y, seed, augment, pad, normalize
        self.epoch, self.params = None, None

    def __len__(self):
        return len(self.y)

    def __getitem__(self, item):
        import torchvision.transforms.functional as F
        from PIL import Image

        epoch, i = item
        x = F.to_tensor(Image.fromarray(self.x[i].transpose(1, 2, 0)))
        if self.normalize == "center":
            x = x - 0.5
        if self.augment:
            if epoch != self.epoch:  # once per epoch in each worker
                self.epoch, self.params = epoch, augment_params(len(self.y), self.seed, epoch, self.pad)
            (top, left), flip = self.params[0][i].tolist(), bool(self.params[1][i])
            x = F.crop(F.pad(x, [self.pad]), top, left, 32, 32)
            x = F.hflip(x) if flip else x
        return (F.normalize(x, MEAN, STD) if self.normalize == "mean_std" else x), int(self.y[i])


class TorchvisionLoader(Planned):
    """The reference pipeline: PIL transforms in DataLoader workers. Same plan of indices and crops per epoch.
    With normalize='mean_std' it takes la.data.batches's MEAN and STD (CIFAR-10's per-channel std over the training set,
    0.2470, 0.2435, 0.2616), not LDAM-DRW's std (0.2023, 0.1994, 0.2010): the same input the tensor loader gives, so
    scripts/bench.py's (a) and (b) differ in the pipeline alone. The tensor loader keeps these constants too: the
    committed runs trained on them."""

    def __init__(self, x, y, batch_size, rank, world_size, seed, device, channels_last, augment=True, crop_pad=4,
                 normalize="mean_std", drop_last=False, workers=2):
        self.dataset = _ArrayDataset(x, y, seed, augment, crop_pad, normalize)
        self.n, self.batch_size, self.rank, self.world_size, self.seed = len(y), batch_size, rank, world_size, seed
        self.device, self.workers, self.drop_last = device, workers, drop_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def batches(self, epoch, start_step=0):
        plan = self.plan(epoch)[start_step:]
        if not plan:
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size // self.world_size,
            sampler=PlanSampler().set(plan, self.rank, self.world_size, epoch),
            num_workers=self.workers, pin_memory=self.device.type == "cuda")
        # the last batch may be shorter; the sampler already holds whole per-rank batches, so this stays aligned
        for x, y in loader:
            yield x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format), y.to(self.device)


def make_loader(cfg, splits, ctx):
    """The training batches a recipe asks for (data.loader), this rank's share, on ctx's device."""
    dc, tc = cfg.data, cfg.train
    kind = TensorLoader if dc.loader == "tensor" else TorchvisionLoader
    extra = {"workers": dc.workers} if dc.loader == "torchvision" else {}
    return kind(splits.train_x, splits.train_y, tc.batch_size, ctx.rank, ctx.world_size, tc.seed, ctx.device,
                tc.channels_last, dc.augment, dc.crop_pad, dc.normalize, dc.drop_last, **extra)
