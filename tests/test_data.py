import math
import pickle
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from la import UserError, data
from conftest import PROTOCOL, SHARED_DATA, Payload


def test_exponential_counts_match_the_literature():
    c10 = data.class_counts(10, 5000, 100)
    assert c10 == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(c10) == 12406
    assert sum(data.class_counts(100, 500, 100)) == 10847
    assert data.class_counts(10, 5000, 200)[-1] == 25


def test_largest_rho_is_the_last_that_keeps_a_tail_image():
    for n_max, largest in ((5000, 5000.0), (500, 500.0), (60, 60.0), (49, math.nextafter(49.0, 0))):  # 49 * (1 / 49) < 1
        assert data.largest_rho(n_max) == largest
        assert data.class_counts(10, n_max, largest)[-1] == 1
        assert data.class_counts(10, n_max, math.nextafter(largest, math.inf))[-1] == 0


def test_step_profile_and_balanced_rho():
    assert data.class_counts(10, 5000, 10, "step") == [5000] * 5 + [500] * 5
    assert data.class_counts(10, 5000, 1) == [5000] * 10
    assert data.class_counts(100, 500, 1, "step") == [500] * 100


def ldam_drw_indices(labels, img_num_per_cls, seed):
    """kaidic/LDAM-DRW IMBALANCECIFAR.gen_imbalanced_data, as published (global numpy seed)."""
    np.random.seed(seed)
    targets_np = np.array(labels, dtype=np.int64)
    classes = np.unique(targets_np)
    picked = []
    for the_class, the_img_num in zip(classes, img_num_per_cls):
        idx = np.where(targets_np == the_class)[0]
        np.random.shuffle(idx)
        picked.append(idx[:the_img_num])
    return np.concatenate(picked)


def test_same_images_as_ldam_drw_and_global_seed_untouched():
    labels = np.random.RandomState(7).permutation(np.repeat(np.arange(10), 500))
    counts = data.class_counts(10, 500, 100)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    ours = data.longtail_indices(labels, counts, seed=0)
    assert np.array_equal(np.random.get_state()[1], before), "the global numpy RNG must not be used"
    assert np.array_equal(ours, ldam_drw_indices(labels, counts, 0))
    assert not np.array_equal(ours, data.longtail_indices(labels, counts, seed=1))


def test_validation_is_balanced_disjoint_and_recorded(fake_root):
    cfg = data_cfg(fake_root, rho=10, val_per_class=3)
    s = data.prepare(cfg)
    # class 0 keeps all 60 images in the subset, so its 3 validation images leave training
    assert s.manifest["subset_counts"][0] == 60 and s.manifest["class_counts"][0] == 57
    assert s.manifest["moved_to_val"] == [3] + [0] * 9
    assert np.bincount(s.val_y, minlength=10).tolist() == [3] * 10
    assert np.bincount(s.train_y, minlength=10).tolist() == s.counts
    x, y, _, _ = data.load_cifar(fake_root, "cifar10")
    train_idx = data.longtail_indices(y, data.class_counts(10, 60, 10), 0)
    kept, val = data.carve_validation(y, train_idx, 3, 0)
    assert not set(kept) & set(val)
    assert len(set(val)) == 30


def test_validation_larger_than_the_pool_is_an_error():
    labels = np.repeat(np.arange(4), 10)
    train_idx = data.longtail_indices(labels, [10, 6, 4, 2], 0)
    with pytest.raises(UserError, match="unused pool"):
        data.carve_validation(labels, train_idx, 6, 0)  # class 0 would give 6 of its 10


def data_cfg(root, **kw):
    from la.config import Data

    return Data(root=str(root), download=False, **kw)


def test_cifar100_layout_loads(fake_root):
    s = data.prepare(data_cfg(fake_root, dataset="cifar100", rho=10, val_per_class=1))
    assert len(s.counts) == 100 and s.counts[0] == 11 and s.counts[-1] == 1


def test_missing_data_names_the_path(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path.resolve())):
        data.load_cifar(tmp_path, "cifar10", download=False)


def test_corrupt_file_is_a_user_error(tmp_path, fake_root):
    shutil.copytree(fake_root / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupt CIFAR file .*data_batch_3"):
        data.load_cifar(tmp_path, "cifar10")


def _copy(fake_root, tmp_path, dataset="cifar10"):
    folder = data.LAYOUT[dataset][0]
    shutil.copytree(fake_root / folder, tmp_path / folder)
    return tmp_path / folder


def test_a_planted_cifar_file_is_refused_by_name_and_never_runs(tmp_path, fake_root):
    base = _copy(fake_root, tmp_path)
    (base / "test_batch").write_bytes(pickle.dumps({"data": Payload(tmp_path / "pwned"), "labels": [0]}, PROTOCOL))
    with pytest.raises(UserError, match=r"CIFAR file .*test_batch was not loaded: it asks to import io\.open"):
        data.load_cifar(tmp_path, "cifar10")
    assert not (tmp_path / "pwned").exists()


def test_the_metadata_files_are_never_unpickled(tmp_path, fake_root):
    for dataset, meta in (("cifar10", "batches.meta"), ("cifar100", "meta")):
        (_copy(fake_root, tmp_path, dataset) / meta).write_bytes(pickle.dumps(Payload(tmp_path / f"pwned_{meta}"), PROTOCOL))
        data.load_cifar(tmp_path, dataset)
        assert not (tmp_path / f"pwned_{meta}").exists()


def test_arrays_pickled_by_numpy_1_and_2_both_load(tmp_path, fake_root):
    base = _copy(fake_root, tmp_path)
    expected = data.load_cifar(tmp_path, "cifar10")
    # protocol 3 names the reconstructor in plain text; the original CIFAR files (numpy 1) say numpy.core.multiarray
    pickled = pickle.dumps(pickle.load(open(base / "data_batch_1", "rb")), 3)
    assert b"numpy._core.multiarray\n_reconstruct" in pickled
    (base / "data_batch_1").write_bytes(pickled.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    assert all(np.array_equal(a, b) for a, b in zip(data.load_cifar(tmp_path, "cifar10"), expected))
    # protocol 5 (Python 3.8+'s default for some writers) rebuilds arrays from a buffer
    pickled = pickle.dumps(pickle.load(open(base / "data_batch_2", "rb")), 5)
    assert b"_frombuffer" in pickled
    (base / "data_batch_2").write_bytes(pickled)
    assert all(np.array_equal(a, b) for a, b in zip(data.load_cifar(tmp_path, "cifar10"), expected))
    # protocol 2 from Python 3 (what the GPU machine's unpack.py writes) rebuilds bytes with _codecs.encode(s, latin1)
    pickled = pickle.dumps(pickle.load(open(base / "data_batch_3", "rb")), 2)
    assert b"_codecs\nencode" in pickled
    (base / "data_batch_3").write_bytes(pickled)
    assert all(np.array_equal(a, b) for a, b in zip(data.load_cifar(tmp_path, "cifar10"), expected))
    # any other encoding is refused: that name admits one use
    (base / "data_batch_3").write_bytes(pickled.replace(b"latin1", b"rot_13"))
    with pytest.raises(UserError, match="asks to import _codecs.encode with str, 'rot_13'"):
        data.load_cifar(tmp_path, "cifar10")


@pytest.mark.skipif(not (SHARED_DATA / "cifar-10-batches-py").is_dir(), reason="real CIFAR-10 not present")
def test_real_cifar10_lt_counts():
    s = data.prepare(data_cfg(SHARED_DATA, val_per_class=0))
    assert len(s.train_y) == 12406 and s.counts[-1] == 50 and len(s.test_y) == 10000
    with pytest.raises(UserError, match=r"^data\.rho=6000 leaves class 9 of cifar10 without a training image \(5000 per "
                                        r"class\); the largest rho it allows is 5000$"):
        data.prepare(data_cfg(SHARED_DATA, rho=6000))


def test_epoch_plan_shards_are_disjoint_and_cover():
    plans = [data.epoch_plan(103, 16, 2, seed=0, epoch=3) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*plans)), "the plan must be a pure function of (seed, epoch)"
    seen = torch.cat([data.shard(b, r, 2) for b in plans[0] for r in range(2)])
    assert len(seen) == len(set(seen.tolist())) == 102  # 103 cut to a multiple of the world size
    assert not torch.equal(plans[0][0], data.epoch_plan(103, 16, 2, seed=0, epoch=4)[0])


def test_crop_flip_equals_torchvision_pad_crop_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    offsets = torch.tensor([[0, 0], [8, 8], [4, 4], [0, 8], [3, 5], [7, 1]])
    flips = torch.tensor([False, True, False, True, True, False])
    out = data.crop_flip(x, offsets, flips)
    for i in range(6):
        ref = TF.crop(TF.pad(x[i], [4]), int(offsets[i, 0]), int(offsets[i, 1]), 32, 32)
        ref = TF.hflip(ref) if flips[i] else ref
        assert torch.equal(out[i], ref)
    assert torch.equal(out[2], x[2])


def test_augmentation_distribution_matches_torchvision():
    offsets, flips = data.augment_params(20000, seed=0, epoch=0)
    assert offsets.min() == 0 and offsets.max() == 8
    freq = torch.bincount(offsets.flatten(), minlength=9).float() / offsets.numel()
    assert torch.allclose(freq, torch.full((9,), 1 / 9), atol=0.01)  # RandomCrop(32, 4): uniform on 0..8
    assert abs(flips.float().mean().item() - 0.5) < 0.02


def test_tensor_and_torchvision_loaders_agree_in_pixel_statistics(fake_root):
    s = data.prepare(data_cfg(fake_root, rho=1, val_per_class=0))
    kw = dict(batch_size=300, rank=0, world_size=1, seed=0, device=torch.device("cpu"), channels_last=False)
    fast = torch.cat([x for x, _ in data.TensorLoader(s.train_x, s.train_y, **kw).batches(0)])
    ref = torch.cat([x for x, _ in data.TorchvisionLoader(s.train_x, s.train_y, workers=0, **kw).batches(0)])
    assert fast.shape == ref.shape
    assert abs(fast.mean() - ref.mean()) < 0.02 and abs(fast.std() - ref.std()) < 0.02
    # padding shows as exactly the normalised value of a black pixel, equally often on both paths
    black = ((0 - torch.tensor(data.MEAN)) / torch.tensor(data.STD)).view(1, 3, 1, 1)
    pad_fast, pad_ref = [(torch.isclose(t, black, atol=1e-4).all(1)).float().mean() for t in (fast, ref)]
    assert pad_fast > 0.02 and abs(pad_fast - pad_ref) < 0.01
    # same plan of labels: both loaders see the images in the same order
    y_fast = torch.cat([y for _, y in data.TensorLoader(s.train_x, s.train_y, **kw).batches(0)])
    y_ref = torch.cat([y for _, y in data.TorchvisionLoader(s.train_x, s.train_y, workers=0, **kw).batches(0)])
    assert torch.equal(y_fast, y_ref)


def test_torchvision_loader_is_keyed_to_seed_epoch_index(fake_root):
    """Issue 25 item 5: workers seeded alike on every rank, and a resume re-dealing batches to workers, changed the
    crops; now each image's crop and flip is the tensor loader's draw for (seed, epoch, index)."""
    s = data.prepare(data_cfg(fake_root, rho=10, val_per_class=0))
    kw = dict(batch_size=32, seed=3, device=torch.device("cpu"), channels_last=False)
    fast = list(data.TensorLoader(s.train_x, s.train_y, rank=0, world_size=1, **kw).batches(1))
    whole = list(data.TorchvisionLoader(s.train_x, s.train_y, rank=0, world_size=1, workers=0, **kw).batches(1))
    rank1 = list(data.TorchvisionLoader(s.train_x, s.train_y, rank=1, world_size=2, workers=0, **kw).batches(1))
    resumed = list(data.TorchvisionLoader(s.train_x, s.train_y, rank=1, world_size=2, workers=2, **kw).batches(1, 2))
    assert len(fast) == len(whole) > 3
    for (xf, yf), (xw, yw) in zip(fast, whole):  # the same pixels as the tensor loader, to rounding
        assert torch.equal(yf, yw) and torch.allclose(xf, xw, atol=1e-5)
    for (xw, yw), (xr, yr) in zip(whole, rank1):  # rank 1 takes the second half of each global batch
        assert torch.equal(yw[len(yw) - len(yr):], yr) and torch.equal(xw[len(yw) - len(yr):], xr)
    assert len(resumed) == len(rank1) - 2  # resumed at step 2 with two workers: the same batches
    for (x1, y1), (xr, yr) in zip(rank1[2:], resumed):
        assert torch.equal(y1, yr) and torch.equal(x1, xr)


def test_the_manifest_hashes_the_pixels_and_old_manifests_still_match(tmp_path, fake_root):
    """The indices come from the labels alone: a copy with other pixels and the same labels gives the same index
    hashes, and only the pixel hashes tell it apart."""
    cfg = data_cfg(fake_root, rho=10, val_per_class=3)
    ours = data.prepare(cfg)
    base = _copy(fake_root, tmp_path)
    for name, split in (("data_batch_1", "train"), ("test_batch", "test")):
        d = pickle.load(open(base / name, "rb"))
        d["data"] = d["data"].copy()
        d["data"][:, 0] ^= 1  # one bit of one pixel of every image
        (base / name).write_bytes(pickle.dumps(d, PROTOCOL))
    cfg.root = str(tmp_path)
    other = data.prepare(cfg).manifest
    assert other["train_index_sha256"] == ours.manifest["train_index_sha256"]
    differ = {k for k in ours.manifest if ours.manifest[k] != other[k]}
    assert {"train_pixels_sha256", "test_pixels_sha256"} <= differ <= set(data.PIXEL_KEYS)
    assert ours.manifest["train_pixels_sha256"] == data.pixel_hash(ours.train_x)
    assert data.same_split(ours.manifest, ours.manifest) and not data.same_split(ours.manifest, other)
    # a manifest written before the pixel hashes (split.json, checkpoints) is checked on what it holds
    old = {k: v for k, v in ours.manifest.items() if k not in data.PIXEL_KEYS}
    assert data.same_split(old, other) and not data.same_split({**old, "train_size": 1}, other)
