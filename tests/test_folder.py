"""--dataset folder and --dataset list (la/data/folder.py): your own long-tailed images, on a generated folder."""
import json
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run
from la import UserError
from la.data import folder
from la.config import Data

sys.path.insert(0, str(REPO / "scripts"))
import make_toy_folder  # noqa: E402

FOLDER_TINY = ["--dataset", "folder", "--set", "data.image_size=32", "--set", "data.val_per_class=4",
               "--set", "data.workers=0", "--set", "train.batch_size=16", "--set", "train.precision=fp32",
               "--set", "train.compile=false", "--set", "train.eval_batch_size=16", "--set", "model.name=resnet8"]


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A 5-class folder, training counts 60, 28, 13, 6, 3, 9 test images per class (45: odd, for 2 ranks)."""
    root = tmp_path_factory.mktemp("toy")
    counts = make_toy_folder.make(root, classes=5, head=60, rho=20, test_per_class=9)
    return root, counts


@pytest.fixture(scope="session")
def toy_run(toy, tmp_path_factory):
    """One CE run of 1 epoch under torchrun with 2 processes, then eval.py --posthoc --tau-sweep in one."""
    root, _ = toy
    cwd = tmp_path_factory.mktemp("folder_run")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run(torchrun + [REPO / "train.py", "--data-root", root, "--epochs", "1", "--out", cwd / "run"] + FOLDER_TINY, cwd)
    ev = run([REPO / "eval.py", cwd / "run", "--posthoc", "--tau-sweep"], cwd)
    return cwd / "run", ev


def cfg(root, **kw):
    return Data(root=str(root), **{"dataset": "folder", "image_size": 32, "val_per_class": 4, "workers": 0, **kw})


def test_folder_run_gives_the_table_with_the_prior_after_the_carved_split(toy_run):
    run_dir, ev = toy_run
    split = json.loads((run_dir / "split.json").read_text())
    # min(4, half the class) of 60, 28, 13, 6, 3 go to validation; the prior is what is left
    assert split["val_counts"] == [4, 4, 4, 3, 1] and split["class_counts"] == [56, 24, 9, 3, 2]
    assert split["classes"] == [f"class{c:02d}" for c in range(5)] and split["test_size"] == 45
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["class_counts"] == [56, 24, 9, 3, 2]
    test = report["test"]
    lo, hi = test["raw"]["balanced_acc_ci95"]
    assert lo <= test["raw"]["balanced_acc"] <= hi and test["posthoc"]["tau"] == 1.0
    assert "tau chosen on validation" in ev.stdout and "medium-shot (20-100)" in ev.stdout
    # exact 2-rank evaluation: the in-training numbers (45 test images sharded over 2 ranks) are those eval.py
    # computes in one process from the checkpoint
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_top1"] == pytest.approx(test["raw"]["top1"], abs=1e-9)
    assert last["test_balanced_acc"] == pytest.approx(test["raw"]["balanced_acc"], abs=1e-9)
    assert last["val_top1"] == pytest.approx(report["val"]["raw"]["top1"], abs=1e-9)


def test_folder_loader_is_keyed_and_resumes_mid_epoch_exactly(toy):
    root, _ = toy
    s = folder.prepare(cfg(root))
    kw = dict(batch_size=16, seed=1, device=torch.device("cpu"), channels_last=False)
    whole = list(folder.FolderLoader(s.train_x, rank=0, world_size=1, workers=0, **kw).batches(1))
    resumed = list(folder.FolderLoader(s.train_x, rank=0, world_size=1, workers=2, **kw).batches(1, 2))
    assert len(resumed) == len(whole) - 2 > 0
    for (xw, yw), (xr, yr) in zip(whole[2:], resumed):
        assert torch.equal(yw, yr) and torch.equal(xw, xr)
    other = list(folder.FolderLoader(s.train_x, rank=0, world_size=1, workers=0, **kw).batches(2))
    assert not torch.equal(whole[0][0], other[0][0])  # a new epoch draws new crops
    assert whole[0][0].shape == (16, 3, 32, 32)


def test_bad_folder_and_list_inputs_are_one_line(toy, tmp_path):
    root, _ = toy
    bad = tmp_path / "bad"
    make_toy_folder.make(bad, classes=2, head=6, rho=2, test_per_class=2)
    (bad / "test" / "zebra").mkdir()
    with pytest.raises(UserError, match=r"zebra is a class that .*train does not have"):
        folder.prepare(cfg(bad))
    (bad / "test" / "zebra").rmdir()
    (bad / "train" / "class00" / "00000.png").write_bytes(b"\x89PNG\r\n\x1a\n, then not a png")
    s = folder.prepare(cfg(bad, val_per_class=0))
    loader = folder.FolderLoader(s.train_x, 64, 0, 1, 0, torch.device("cpu"), False, workers=1)
    with pytest.raises(UserError, match=r"^unreadable image .*00000.png: UnidentifiedImageError") as e:
        list(loader.batches(0))
    assert "\n" not in str(e.value)
    # list files: a missing image, a label out of range, a class without training images
    (tmp_path / "train.txt").write_text("train/class01/00000.png 0\ntrain/class01/00001.png 2\n")
    (tmp_path / "test.txt").write_text("test/class01/00000.png 0\ntest/class00/00000.png 7\n")
    lists = dict(dataset="list", train_list=str(tmp_path / "train.txt"), test_list=str(tmp_path / "test.txt"))
    with pytest.raises(UserError, match=r"data.test_list has label 7, outside the training labels 0..2"):
        folder.prepare(cfg(bad, **lists))
    (tmp_path / "test.txt").write_text("test/class01/00000.png 0\n")
    with pytest.raises(UserError, match=r"class 1 has no training image"):
        folder.prepare(cfg(bad, **lists))
    (tmp_path / "test.txt").write_text("test/class01/nope.png 0\n")
    with pytest.raises(UserError, match=r"test.txt lists .*nope.png, which does not exist"):
        folder.prepare(cfg(bad, **lists))


def test_inaturalist_json_list(toy, tmp_path):
    root, counts = toy
    images = [{"id": i, "file_name": f"train/class{c:02d}/{k:05d}.png"}
              for i, (c, k) in enumerate((c, k) for c in range(5) for k in range(counts[c]))]
    notes = [{"image_id": im["id"], "category_id": int(im["file_name"][11:13])} for im in images]
    (tmp_path / "train.json").write_text(json.dumps({"images": images, "annotations": notes}))
    (tmp_path / "test.txt").write_text("".join(f"test/class{c:02d}/00000.png {c}\n" for c in range(5)))
    s = folder.prepare(cfg(root, dataset="list", train_list=str(tmp_path / "train.json"),
                           test_list=str(tmp_path / "test.txt")))
    assert s.counts == [56, 24, 9, 3, 2] and s.test_y.tolist() == [0, 1, 2, 3, 4]


def test_a_folder_run_resumed_by_train_py_ends_as_an_uninterrupted_one(toy, tmp_path):
    """train.py --resume on a folder run: 1 epoch then 1 more is the 2-epoch run, weights and metrics (bar timing)."""
    root, _ = toy
    base = [REPO / "train.py", "--data-root", root] + FOLDER_TINY + ["--set", "train.eval_every=2"]
    run(base + ["--epochs", "2", "--out", tmp_path / "whole"], tmp_path)
    run(base + ["--epochs", "1", "--out", tmp_path / "split"], tmp_path)
    run(base + ["--epochs", "2", "--out", tmp_path / "split", "--resume"], tmp_path)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False)["model"] for d in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    untimed = lambda d: [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "eval_seconds", "img_per_s")}
                         for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    whole, split = untimed("whole"), untimed("split")
    assert len(whole) == len(split) == 2 and whole[1] == split[1]  # the last epoch, evaluated, alike
    # epoch 1 was the split run's last, so it was evaluated there too: its training figures are the same
    assert whole[0] == {k: v for k, v in split[0].items() if k in whole[0]}


def test_a_16_bit_grayscale_png_is_scaled_to_8_bits_not_saturated(tmp_path):
    """convert("RGB") clips 16-bit grayscale at 255: a random image came out almost all white."""
    from PIL import Image

    a = np.random.RandomState(0).randint(0, 65536, (16, 16)).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "deep.png")
    im = folder._decode(tmp_path / "deep.png")
    x = np.asarray(im)
    assert im.mode == "RGB" and x.shape == (16, 16, 3)
    assert (x == (a >> 8).astype(np.uint8)[:, :, None]).all()
    Image.fromarray((a >> 8).astype(np.uint8)).save(tmp_path / "flat.png")  # 8-bit grayscale: as it was
    assert (np.asarray(folder._decode(tmp_path / "flat.png")) == x).all()


def test_images_in_sub_folders_of_a_class_folder_are_read_as_imagefolder_reads_them(tmp_path):
    root = tmp_path / "nested"
    make_toy_folder.make(root, classes=2, head=6, rho=2, test_per_class=2)
    flat = folder.prepare(cfg(root, val_per_class=0))
    sub = root / "train" / "class00" / "a" / "b"
    sub.mkdir(parents=True)
    for f in sorted((root / "train" / "class00").glob("0000[0-2].png")):
        f.rename(sub / f.name)
    s = folder.prepare(cfg(root, val_per_class=0))
    assert s.counts == flat.counts == [6, 3]
    assert sum("/a/b/" in p for p in s.train_x.paths) == 3


@pytest.mark.parametrize("content, message", [
    (b"train/class00/00000.png --3\n", r"train.txt line 1: expected 'relative/path label' with an integer label, "
                                      r"got 'train/class00/00000.png --3'"),
    ("train/class00/00000.png 0\ntrain/class00/00001.png \u00b2\n".encode(), r"train.txt line 2: .*integer label"),
    (b"train/class00/00000.png 0\n\ntrain/class00/00001.png 1.7\n", r"train.txt line 3: .*integer label, got .*1\.7"),
    (b"train/class00/00000.png 0\ntrain/class00/caf\xe9.png 0\n", r"train.txt line 2 is not UTF-8 text \(byte 0xe9\)"),
])
def test_bad_list_lines_are_one_line_naming_file_and_line(tmp_path, content, message):
    root = tmp_path / "d"
    make_toy_folder.make(root, classes=2, head=6, rho=2, test_per_class=2)
    (tmp_path / "train.txt").write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        folder.read_list(tmp_path / "train.txt", root)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("label", ["cat", None, 1.7, True])
def test_an_inaturalist_category_id_that_is_not_an_integer_is_one_line(tmp_path, label):
    images = [{"id": 7, "file_name": "a.png"}, {"id": 8, "file_name": "b.png"}]
    notes = [{"image_id": 7, "category_id": 0}, {"image_id": 8, "category_id": label}]
    (tmp_path / "train.json").write_text(json.dumps({"images": images, "annotations": notes}))
    with pytest.raises(UserError, match=r"train.json annotation 1 \(image_id 8\): category_id .* is not an integer"):
        folder.read_list(tmp_path / "train.json", tmp_path)


def test_a_directory_given_as_a_list_file_is_named_as_one(tmp_path):
    with pytest.raises(UserError, match=r"list file .* is a directory"):
        folder.read_list(tmp_path, tmp_path)


def test_file_and_class_names_that_are_not_utf8_are_read_and_hashed(tmp_path):
    """Names from a zip archive may not be UTF-8: Python hands them over surrogate-escaped."""
    import os

    root = tmp_path / "latin1"
    make_toy_folder.make(root, classes=2, head=6, rho=2, test_per_class=2)
    for split in ("train", "test"):
        os.rename(root / split / "class01", os.path.join(os.fsencode(root / split), b"caf\xe9"))
    os.rename(os.path.join(os.fsencode(root / "train"), b"caf\xe9", b"00000.png"),
              os.path.join(os.fsencode(root / "train"), b"caf\xe9", b"\xff.png"))
    s = folder.prepare(cfg(root, val_per_class=0))
    assert s.manifest["classes"] == ["caf\udce9", "class00"] and s.counts == [3, 6]
    assert len(s.manifest["train_sha256"]) == 16
    json.dumps(s.manifest)  # split.json holds it


def test_unreadable_files_are_found_at_start_up_not_when_an_epoch_reads_them(tmp_path):
    """A broken link, a macOS ._ companion, a file that is not an image: one line from prepare, before training."""
    root = tmp_path / "d"
    make_toy_folder.make(root, classes=2, head=6, rho=2, test_per_class=2)
    folder.prepare(cfg(root))
    cls = root / "train" / "class01"
    (cls / "00009.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(UserError, match=r"^image file .*class01/00009.png is a broken link$"):
        folder.prepare(cfg(root))
    (cls / "00009.png").unlink()
    (cls / "._00000.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    with pytest.raises(UserError, match=r"^image file .*/\._00000.png is not a JPEG, PNG.*a macOS \._ companion"):
        folder.prepare(cfg(root))
    (cls / "._00000.png").unlink()
    (root / "test" / "class00" / "empty.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty.jpg is not a JPEG, PNG, .* \(it starts b''\)"):
        folder.prepare(cfg(root))
    (root / "test" / "class00" / "empty.jpg").unlink()
    (tmp_path / "train.txt").write_text("train/class00/00000.png 0\ntrain/class01 1\n")
    with pytest.raises(UserError, match=r"train.txt lists .*train/class01, which is not a regular file"):
        folder.read_list(tmp_path / "train.txt", root)


def test_a_checkpoint_is_saved_before_the_epoch_is_evaluated(fake_root, tmp_path, monkeypatch):
    """An evaluation that fails (an image gone bad since start-up) must not lose the epoch just trained."""
    sys.path.insert(0, str(REPO))
    import train
    from la import engine

    from conftest import TINY

    def fails(*a, **k):
        raise UserError("evaluation failed")

    monkeypatch.setattr(engine, "evaluate_splits", fails)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="evaluation failed"):
        train.main(["--data-root", str(fake_root), "--out", str(tmp_path / "run"), "--epochs", "2",
                    "--set", "train.eval_every=1"] + TINY)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0)


def test_an_empty_val_folder_or_list_is_one_line_not_a_missing_validation_split(tmp_path):
    root = tmp_path / "d"
    make_toy_folder.make(root, classes=2, head=6, rho=2, test_per_class=2)
    (root / "val").mkdir()
    with pytest.raises(UserError, match=r"d/val/ holds no images .*remove val/ to carve data.val_per_class"):
        folder.prepare(cfg(root))
    (root / "val" / "class00").mkdir()
    with pytest.raises(UserError, match=r"d/val/ holds no images"):
        folder.prepare(cfg(root))
    (root / "val" / "class00").rmdir()
    (root / "val").rmdir()
    assert folder.prepare(cfg(root)).manifest["val_counts"] == [3, 1]  # carved
    (tmp_path / "train.txt").write_text("train/class00/00000.png 0\ntrain/class01/00000.png 1\n")
    (tmp_path / "val.txt").write_text("\n")
    lists = dict(dataset="list", train_list=str(tmp_path / "train.txt"), val_list=str(tmp_path / "val.txt"),
                 test_list=str(tmp_path / "train.txt"))
    with pytest.raises(UserError, match=r"data.val_list .*val.txt lists no images; .*leave data.val_list empty"):
        folder.prepare(cfg(root, **lists))


@pytest.mark.parametrize("key, value", [("data.rho", "50"), ("data.profile", "step"), ("data.crop_pad", "2"),
                                        ("data.loader", "torchvision")])
def test_a_cifar_only_key_set_for_a_folder_or_list_dataset_is_refused_in_one_line(key, value, tmp_path):
    from la import config

    for dataset in ("folder", "list"):
        with pytest.raises(UserError, match=rf"^{key}=.* does not apply to --dataset {dataset}: .*leave it at its"):
            config.build(overrides=[("data.dataset", dataset), (key, value)])
    assert config.build(overrides=[("data.dataset", "cifar10"), (key, value)])  # CIFAR's own key
    proc = run([REPO / "train.py", "--dataset", "folder", "--data-root", tmp_path, "--set", f"{key}={value}"],
               tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "does not apply" in proc.stderr


def test_drop_last_and_normalize_apply_to_folder_datasets(toy):
    root, _ = toy
    s = folder.prepare(cfg(root))  # 94 training images: 5 batches of 16 and one of 14
    kw = dict(batch_size=16, rank=0, world_size=1, seed=0, device=torch.device("cpu"), channels_last=False, workers=0)
    assert folder.FolderLoader(s.train_x, **kw).steps(0) == 6
    assert folder.FolderLoader(s.train_x, **kw, drop_last=True).steps(0) == 5
    x_std = next(folder.FolderLoader(s.train_x, **kw).batches(0))[0]
    x_center = next(folder.FolderLoader(s.train_x, **kw, normalize="center").batches(0))[0]
    mean, std = torch.tensor(folder.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(folder.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(x_center, (x_std * std + mean) - 0.5, atol=1e-5)
    # evaluation scales as training did
    from la import engine, runtime
    rt = runtime.Runtime(torch.device("cpu"))
    seen = []
    model = torch.nn.Module()
    model.forward = lambda x: seen.append(x) or torch.zeros(len(x), 5)
    engine.compute_logits(model, s.test_x[:4], rt, normalize="center")
    assert -0.5 <= float(seen[0].min()) and float(seen[0].max()) <= 0.5
