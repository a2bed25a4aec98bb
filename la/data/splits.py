"""What a source's prepare() returns (Splits), and how a recorded split manifest is checked against one."""
from dataclasses import dataclass

import numpy as np


def same_split(saved, now):
    """Whether a manifest recorded earlier (a checkpoint's) describes the split `now`: every field it holds agrees.
    Manifests written before the pixel hashes were kept lack them, and are checked on what they hold."""
    return isinstance(saved, dict) and all(now.get(k) == v for k, v in saved.items())


@dataclass
class Splits:
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    counts: list
    manifest: dict
