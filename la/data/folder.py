"""The folder and list source, your own long-tailed images: a folder per class (--dataset folder) or list files
(--dataset list), decoded in DataLoader workers, each training image's crop and flip keyed to (seed, epoch, index) so
a resume is exact.

    ROOT/train/<class>/*.jpg|png   ROOT/test/<class>/...   ROOT/val/<class>/... (optional)

Images in sub-folders of a class folder belong to that class, as in torchvision's ImageFolder.

The prior is the training counts after the validation split; without val/ (or data.val_list) a balanced split of
data.val_per_class images per class (never more than half of a class) is carved from the training images; a val/
without images is refused, not taken for "no validation split".
"""
import hashlib
import json
import math
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from la import UserError
from la.data.batches import Normalize, Planned, PlanSampler
from la.data.splits import Splits

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = (".jpg", ".jpeg", ".png")


# ---------------------------------------------------------------- reading the splits

def _images_under(class_dir):
    """The image files anywhere under a class folder, sub-folders and linked folders too, in torchvision
    ImageFolder's order (os.walk with followlinks, sorted)."""
    found = []
    for where, _, names in sorted(os.walk(class_dir, followlinks=True)):
        found += [Path(where) / n for n in sorted(names) if Path(n).suffix.lower() in EXTENSIONS]
    return found


def _scan(split_dir, classes=None):
    """(paths, labels) of a split folder; classes None: this is train/, and its sorted sub-folders are the classes."""
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if classes is None:
        classes = names
    extra = [n for n in names if n not in classes]
    if extra:
        raise UserError(f"{split_dir}/{extra[0]} is a class that {split_dir.parent / 'train'} does not have")
    paths, labels = [], []
    for c, name in enumerate(classes):
        d = split_dir / name
        files = _images_under(d) if d.is_dir() else []
        paths += [str(p) for p in files]
        labels += [c] * len(files)
    return classes, paths, np.asarray(labels, dtype=np.int64)


def _list_text(path):
    """A list file's text, or one line saying why it cannot be one."""
    if path.is_dir():
        raise UserError(f"list file {path} is a directory; name the list file in it")
    if not path.is_file():
        raise UserError(f"list file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"list file {path} cannot be read: {type(e).__name__}: {e.strerror}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path} line {line} is not UTF-8 text (byte {raw[e.start]:#04x}); save the list file as UTF-8")


def _integer(value):
    """An integer label: a JSON integer, or a string of ASCII digits with at most one leading minus; else None."""
    if isinstance(value, str):
        return int(value) if re.fullmatch(r"-?[0-9]+", value) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _json_pairs(path, text):
    """(file_name, label) pairs of an iNaturalist-2018 JSON: images with id and file_name, annotations with
    image_id and category_id."""
    try:
        tree = json.loads(text)
        files = {im["id"]: im["file_name"] for im in tree["images"]}
        notes = [(a["image_id"], a["category_id"]) for a in tree["annotations"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not an iNaturalist-style JSON (images, annotations): {type(e).__name__}: {e}")
    pairs = []
    for i, (image, label) in enumerate(notes):
        where = f"{path} annotation {i} (image_id {image!r})"
        if _integer(label) is None:
            raise UserError(f"{where}: category_id {label!r} is not an integer")
        if image not in files or not isinstance(files[image], str):
            raise UserError(f"{where}: no image with that id and a file_name string")
        pairs.append((files[image], _integer(label)))
    return pairs


def read_list(path, root):
    """(paths, labels) of a list file: 'relative/path label' lines (ImageNet-LT's), or an iNaturalist-2018 JSON
    (images with id and file_name, annotations with image_id and category_id). Paths resolve against root."""
    path = Path(path)
    text = _list_text(path)
    if path.suffix == ".json":
        pairs = _json_pairs(path, text)
    else:
        pairs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                parts = line.rsplit(maxsplit=1)
                label = _integer(parts[-1]) if len(parts) == 2 else None
                if label is None:
                    raise UserError(f"{path} line {n}: expected 'relative/path label' with an integer label, "
                                    f"got {line.strip()!r}")
                pairs.append((parts[0], label))
    paths = [str(Path(root) / p) for p, _ in pairs]
    check_files(paths, lambda p, problem: f"{path} lists {p}, which {problem}")
    return paths, np.asarray([c for _, c in pairs], dtype=np.int64)


SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")  # JPEG PNG GIF BMP TIFF


def _file_problem(path):
    """Why path cannot be an image to decode, without decoding it (a stat and its first 16 bytes), or None."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file"
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        return "is a broken link" if os.path.islink(path) else "does not exist"
    except OSError as e:
        return f"cannot be read: {type(e).__name__}: {e.strerror}"
    if head.startswith(SIGNATURES) or head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return None
    apple = "; a macOS ._ companion file (resource fork), not an image" if Path(path).name.startswith("._") else ""
    return f"is not a JPEG, PNG, GIF, BMP, TIFF or WebP image (it starts {head[:8]!r}{apple})"


def check_files(paths, say):
    """At start-up, not when an epoch first reads it: every file exists, is a regular readable file and starts as an
    image does. The first that does not is one line, say(path, problem). Threads: it is waiting on the disk."""
    with ThreadPoolExecutor(16) as pool:
        for i in range(0, len(paths), 4096):
            for p, problem in zip(paths[i:i + 4096], pool.map(_file_problem, paths[i:i + 4096])):
                if problem:
                    raise UserError(say(p, problem))


def hold_out_validation(labels, per_class, seed):
    """Indices (train, val): per class, min(per_class, half its images) drawn for validation, seeded. Unlike
    la.data.cifar.carve_validation (CIFAR's, from the images its subset left out), a folder is long-tailed already:
    the validation images come out of its own training list."""
    rng = np.random.RandomState(seed + 1_000_003)
    val = []
    for c in range(int(labels.max()) + 1):
        idx = np.where(labels == c)[0]
        val.append(np.sort(rng.choice(idx, min(per_class, len(idx) // 2), replace=False)))
    val = np.concatenate(val) if val else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), val), val


def _hash(paths, labels):
    """Of the (path, label) pairs. A name that is not UTF-8 on disk (from a zip archive, say) reaches Python
    surrogate-escaped; surrogateescape hashes its original bytes, and a UTF-8 name as plain encode() did."""
    h = hashlib.sha256()
    for p, y in zip(paths, labels):
        h.update(f"{p}\t{y}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def _read_splits(dc):
    """{split: (paths, labels)} and the class names, from a folder or list files."""
    root = Path(dc.root)
    if dc.dataset == "folder":
        if not (root / "train").is_dir() or not (root / "test").is_dir():
            raise UserError(f"--dataset folder needs {root}/train/ and {root}/test/, one sub-folder per class")
        classes, *train = _scan(root / "train")
        out = {"train": train, "test": _scan(root / "test", classes)[1:]}
        if (root / "val").is_dir():
            out["val"] = _scan(root / "val", classes)[1:]
        for split, (paths, _) in out.items():
            if split != "train" and not paths:  # train's own line is prepare's
                raise UserError(f"{root / split}/ holds no images (.jpg, .jpeg, .png) in its class folders"
                                + ("; put the validation images there, or remove val/ to carve data.val_per_class "
                                   "per class from train/" if split == "val" else ""))
            check_files(paths, lambda p, problem: f"image file {p} {problem}")
        return out, classes
    lists = {"train": dc.train_list, "val": dc.val_list, "test": dc.test_list}
    for split in ("train", "test"):
        if not lists[split]:
            raise UserError(f"--dataset list needs data.{split}_list")
    out = {s: read_list(Path(root) / f if not Path(f).is_absolute() else f, root) for s, f in lists.items() if f}
    n = int(out["train"][1].max()) + 1 if len(out["train"][1]) else 0
    for split, (_, y) in out.items():
        if split != "train" and not len(y):
            raise UserError(f"data.{split}_list {lists[split]} lists no images"
                            + ("; to carve a validation split from training instead, leave data.val_list empty"
                               if split == "val" else ""))
        bad = y[(y < 0) | (y >= n)]
        if len(bad):
            raise UserError(f"data.{split}_list has label {bad[0]}, outside the training labels 0..{n - 1}")
    return out, [str(c) for c in range(n)]


def prepare(dc):
    """Splits of a folder or list dataset: ImageList 'arrays', training counts, manifest."""
    parts, classes = _read_splits(dc)
    paths, labels = parts["train"]
    if not len(labels):
        raise UserError(f"no training images (.jpg, .jpeg, .png) under {dc.root}")
    carved = "val" not in parts
    if carved:
        train_idx, val_idx = hold_out_validation(labels, dc.val_per_class, dc.subset_seed)
        parts["val"] = ([paths[i] for i in val_idx], labels[val_idx])
        parts["train"] = ([paths[i] for i in train_idx], labels[train_idx])
    counts = np.bincount(parts["train"][1], minlength=len(classes)).tolist()
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        raise UserError(f"class {classes[empty[0]]} has no training image (after the validation split), so its "
                        f"log-prior is -inf")
    manifest = {"dataset": dc.dataset, "classes": classes, "class_counts": counts,
                "val_source": f"carved, {dc.val_per_class} per class at most, never over half a class, seed "
                              f"{dc.subset_seed}" if carved else "given",
                "val_counts": np.bincount(parts["val"][1], minlength=len(classes)).tolist(),
                "image_size": dc.image_size}
    for split, (p, y) in parts.items():
        rel = [str(Path(q).relative_to(dc.root)) if Path(q).is_relative_to(dc.root) else q for q in p]
        manifest.update({f"{split}_size": len(y), f"{split}_sha256": _hash(rel, y.tolist())})
    sets = {s: ImageList(p, y, dc.image_size, dc.workers) for s, (p, y) in parts.items()}
    return Splits(sets["train"], sets["train"].labels, sets["val"], sets["val"].labels, sets["test"],
                  sets["test"].labels, counts, manifest)


# ---------------------------------------------------------------- decoding and augmentation

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grayscale PNGs open as one of these


def to_rgb(im):
    """8-bit RGB of a decoded image. 16-bit grayscale keeps its high byte (v >> 8), as Pillow reads 16-bit RGB PNGs;
    convert("RGB") alone clips it at 255 (white). Everything else is convert("RGB"): grayscale and 1-bit repeat
    into three channels, a palette expands to its colours, RGBA and LA drop alpha, CMYK and YCbCr are converted."""
    from PIL import Image

    if im.mode in SIXTEEN_BIT:
        high = (np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(high, "L").convert("RGB")
    return im.convert("RGB")


def _decode(path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except Exception as e:
        raise UserError(f"unreadable image {path}: {type(e).__name__}: {e}")


def crop_generator(seed, epoch, index):
    """The generator of one training image's augmentation in one epoch: a pure function of (seed, epoch, index)."""
    key = hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)


def resized_crop_params(height, width, g, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, drawing from g instead of the global generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=g).item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(1, generator=g).item())
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=g))
            j = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return i, j, h, w
    in_ratio = width / height  # as torchvision: the whole image, clamped to the ratio range, centred
    w, h = (width, int(round(width / ratio[0]))) if in_ratio < ratio[0] else \
        (int(round(height * ratio[1])), height) if in_ratio > ratio[1] else (width, height)
    return (height - h) // 2, (width - w) // 2, h, w


class _Images(torch.utils.data.Dataset):
    """Items are (epoch, index): training items RandomResizedCrop + flip keyed to (seed, epoch, index); epoch
    None: evaluation, resize to size / 0.875 and centre crop (224 from 256). Returns uint8 3 x size x size."""

    def __init__(self, paths, labels, size, seed):
        # Imported here, in the process that forks the DataLoader workers, so they inherit it rather than import it
        # again; not at module level, where every CIFAR process would pay its two seconds.
        import torchvision.transforms.functional  # noqa: F401
        self.paths, self.labels, self.size, self.seed = paths, labels, size, seed

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, item):
        from torchvision.transforms import functional as F  # imported by __init__: a lookup in sys.modules

        epoch, i = item
        im = _decode(self.paths[i])
        if epoch is None:
            im = F.center_crop(F.resize(im, round(self.size / 0.875)), self.size)
        else:
            g = crop_generator(self.seed, epoch, i)
            top, left, h, w = resized_crop_params(im.height, im.width, g)
            im = F.resized_crop(im, top, left, h, w, [self.size, self.size])
            if torch.rand(1, generator=g).item() < 0.5:
                im = F.hflip(im)
        return F.pil_to_tensor(im), int(self.labels[i])


def one_line(e):
    """A UserError raised in a DataLoader worker arrives wrapped with the worker's traceback: its last line."""
    last = str(e).strip().splitlines()[-1]
    return last.split("UserError: ", 1)[1] if "UserError: " in last else last


class ImageList:
    """A split of image files standing where CIFAR's uint8 array stands in Splits: len, slicing (for the
    evaluation shards of la.engine.evaluate) and batches of decoded, centre-cropped uint8 images."""
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, paths, labels, size, workers):
        self.paths, self.labels, self.size, self.workers = list(paths), np.asarray(labels), size, workers

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, s):
        return ImageList(self.paths[s], self.labels[s], self.size, self.workers)

    def eval_batches(self, batch_size, device):
        dataset = _Images(self.paths, self.labels, self.size, 0)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=[(None, i) for i in range(len(self))],
                                             num_workers=self.workers, pin_memory=device.type == "cuda")
        try:
            for x, _ in loader:
                yield x
        except UserError as e:
            raise UserError(one_line(e))


class FolderLoader(Planned):
    """Training batches of an ImageList through DataLoader workers, on la.data.batches's epoch plan (the same
    permutation and rank shards as the tensor loader); each image's augmentation is keyed to (seed, epoch, global index), so
    neither the worker count nor a mid-epoch resume changes a batch."""

    def __init__(self, images, batch_size, rank, world_size, seed, device, channels_last, augment=True, workers=2,
                 normalize="mean_std", drop_last=False):
        self.n, self.batch_size, self.rank, self.world_size, self.seed = len(images), batch_size, rank, world_size, seed
        self.device, self.augment, self.drop_last = device, augment, drop_last
        self.sampler = PlanSampler()
        cuda = device.type == "cuda"
        self.loader = torch.utils.data.DataLoader(
            _Images(images.paths, images.labels, images.size, seed), batch_size=batch_size // world_size,
            sampler=self.sampler, num_workers=workers, pin_memory=cuda, persistent_workers=cuda and workers > 0)
        self.normalize = Normalize(device, channels_last, normalize, mean=images.mean, std=images.std)

    def batches(self, epoch, start_step=0):
        plan = self.plan(epoch)[start_step:]
        key = epoch if self.augment else None
        self.sampler.set(plan, self.rank, self.world_size, key)
        if not plan:
            return
        try:
            for x, y in self.loader:
                yield self.normalize(x.to(self.device, non_blocking=True)), y.to(self.device)
        except UserError as e:
            raise UserError(one_line(e))


def make_loader(cfg, splits, ctx):
    """This rank's training batches of a folder or list dataset, on ctx's device."""
    dc, tc = cfg.data, cfg.train
    return FolderLoader(splits.train_x, tc.batch_size, ctx.rank, ctx.world_size, tc.seed, ctx.device,
                        tc.channels_last, dc.augment, dc.workers, dc.normalize, dc.drop_last)
