"""scripts/bench.py end to end on synthetic data, with windows too small to mean anything but fast."""
import json

import pytest

from conftest import REPO, run


def test_bench_synthetic_writes_rates_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = run([REPO / "scripts" / "bench.py", "--device", "cpu", "--synthetic", "--compile", "false", "--batch-size", "16",
                "--windows", "2", "--window-steps", "2", "--warmup-steps", "1", "--json", out], cwd=tmp_path, timeout=120)
    assert "train_over_reference" in proc.stdout
    res = json.loads(out.read_text())
    assert res["synthetic"] is True and res["batch_size"] == 16 and res["train_images"] == 12386
    assert res["compile"] is False and not any(f["compiled"] for f in res["figures"].values())
    rate = {name: res["figures"][name]["img_per_s"] for name in ("reference", "train", "ceiling")}
    assert all(r > 0 for r in rate.values())
    assert all(len(res["figures"][name]["windows"]) == 2 for name in rate)
    assert res["ratios"]["train_over_reference"] == pytest.approx(rate["train"] / rate["reference"])
    assert res["ratios"]["train_over_ceiling"] == pytest.approx(rate["train"] / rate["ceiling"])
    assert res["gflop_per_s"] == pytest.approx(rate["train"] * res["gflop_per_image"])
    assert res["gflop_per_image"] == pytest.approx(0.41, rel=0.02)  # DESIGN.md's ResNet-32 figure
    assert res["estimates"]["train"]["seconds_per_epoch"] == pytest.approx(12386 / rate["train"])
