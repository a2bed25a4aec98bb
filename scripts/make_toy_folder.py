"""Write a small long-tailed image folder (ROOT/train/<class>/, ROOT/test/<class>/) to try --dataset folder on.

    python scripts/make_toy_folder.py toy --classes 5 --head 60 --rho 20
    python train.py --dataset folder --data-root toy --set data.image_size=32 --epochs 2 --out runs/toy

Each class is a colour and a stripe period plus noise (learnable in a few steps); training counts follow the exponential profile
head * rho^(-i/(C-1)), the test set is balanced. Images are PNG (lossless, so the files are exactly reproducible).
"""
import argparse
import sys
from pathlib import Path

import numpy as np


def make(root, classes=5, head=60, rho=20.0, test_per_class=10, size=32, seed=0, fmt="png"):
    """Write the folder; returns the training counts per class."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    colors = rng.randint(30, 226, size=(classes, 3))
    # and horizontal stripes of a class's own period: a colour alone is mostly what batch norm subtracts
    rows = np.arange(size)[:, None, None]
    stripes = [60 * np.sign(np.sin(2 * np.pi * rows / (3 + 2 * c))) for c in range(classes)]
    counts = [max(1, int(head * rho ** (-i / max(classes - 1, 1)))) for i in range(classes)]
    for split, per in (("train", counts), ("test", [test_per_class] * classes)):
        for c, n in enumerate(per):
            d = Path(root) / split / f"class{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                noise = rng.randint(-30, 31, size=(size, size, 3))
                px = np.clip(colors[c] + stripes[c] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{k:05d}.{fmt}")
    return counts


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--head", type=int, default=60, help="training images of class 0")
    p.add_argument("--rho", type=float, default=20.0, help="head / tail training images")
    p.add_argument("--test-per-class", type=int, default=10)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--format", choices=("png", "jpg"), default="png")
    a = p.parse_args(argv)
    counts = make(a.root, a.classes, a.head, a.rho, a.test_per_class, a.size, fmt=a.format)
    print(f"wrote {a.root}: train counts {counts}, {a.test_per_class} test images per class")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
