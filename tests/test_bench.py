"""scripts/bench.py end to end on synthetic data, with windows too small to mean anything but fast."""
import json
import sys

import pytest

from conftest import REPO, run

sys.path.insert(0, str(REPO / "scripts"))

FAST = ["--device", "cpu", "--synthetic", "--compile", "false", "--batch-size", "16", "--windows", "2", "--window-steps", "2",
        "--warmup-steps", "1"]


def test_bench_synthetic_writes_rates_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = run([REPO / "scripts" / "bench.py", *FAST, "--precision", "fp32", "--grid", "yes", "--json", out],
               cwd=tmp_path, timeout=120, env={"LA_CACHE_DIR": str(tmp_path / "cache")})
    assert "train_over_reference" in proc.stdout
    res = json.loads(out.read_text())
    assert res["synthetic"] is True and res["batch_size"] == 16 and res["train_images"] == 12386
    assert res["compile"] is False and not any(f["compiled"] for f in res["figures"].values())
    rate = {name: res["figures"][name]["img_per_s"] for name in ("reference", "train", "ceiling", "train_fp32_eager")}
    assert set(res["figures"]) == set(rate)  # --precision and --compile given: the grid has the one setting left
    assert all(r > 0 for r in rate.values())
    assert all(len(res["figures"][name]["windows"]) == 2 for name in rate)
    assert res["ratios"]["train_over_reference"] == pytest.approx(rate["train"] / rate["reference"])
    assert res["ratios"]["train_over_ceiling"] == pytest.approx(rate["train"] / rate["ceiling"])
    assert res["ratios"]["train_over_best_fixed"] == pytest.approx(rate["train"] / rate["train_fp32_eager"])
    assert res["gflop_per_s"] == pytest.approx(rate["train"] * res["gflop_per_image"])
    assert res["gflop_per_image"] == pytest.approx(0.41, rel=0.02)  # He et al.'s ResNet-32: about 0.41 GFLOP per image
    assert res["estimates"]["train"]["seconds_per_epoch"] == pytest.approx(12386 / rate["train"])


def test_bench_concurrent_runs_report_aggregate_rates(tmp_path):
    out = tmp_path / "bench.json"
    run([REPO / "scripts" / "bench.py", *FAST, "--precision", "fp32", "--model", "resnet32", "--bn-batch", "8",
         "--loss", "ldam", "--concurrent", "2", "--json", out], cwd=tmp_path, timeout=180)
    res = json.loads(out.read_text())
    assert res["figures"] == {} and res["bn_batch"] == 8 and res["loss"] == "ldam"
    rows = {row["k"]: row for row in res["concurrent"]}
    assert sorted(rows) == [2] and len(rows[2]["per_run_img_per_s"]) == 2
    for row in rows.values():
        # each run trained 2 x 2 steps of 16 images inside the span the aggregate is taken over
        assert 0 < max(row["per_run_img_per_s"]) and row["aggregate_img_per_s"] <= sum(row["per_run_img_per_s"]) * 1.0001
        assert row["full_runs_per_hour"] == pytest.approx(row["aggregate_img_per_s"] * 3600 / (12386 * 200))


def test_bench_folder_times_the_loader_alone_and_training_on_generated_jpegs(tmp_path):
    import bench  # in this process: a second interpreter would double the test's time

    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--dataset", "folder", "--images", "40", "--image-size", "32", "--batch-size", "8",
                       "--windows", "2", "--window-steps", "1", "--warmup-steps", "0", "--workers", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["figures"]) == {"loader_0_workers", "loader_1_workers", "train"}
    assert res["train_images"] == sum(int(10 * 10 ** (-i / 9)) for i in range(10))  # make_toy_folder's profile
    assert all(len(f["windows"]) == 2 and f["img_per_s"] > 0 for f in res["figures"].values())
    assert res["per_core_decode_img_per_s"] > 0 and res["model"] == "resnet32"
