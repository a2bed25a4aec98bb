"""train.precision=auto / train.compile=auto on a CPU: decisions follow timings (planted here, never measured for
an assertion), explicit settings are obeyed, the measuring leaves the run untouched, and a resumed run keeps its
precision."""
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, TINY, run
from la import autotune, build, config, hardware

CPU = SimpleNamespace(device=torch.device("cpu"), world_size=1, distributed=False, is_main=True, rank=0)


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A CPU with a C++ compiler where bf16 runs, and an empty timing cache."""
    monkeypatch.setenv("LA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "cxx_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(hardware, "cpu_runs_bf16", lambda: True)


def choose(planted, steps_left=10_000, keep_cache=False, **settings):
    """autotune.choose with planted seconds per step; returns (runtime, compiled model or None, timer calls)."""
    if not keep_cache:
        autotune.cache_file().unlink(missing_ok=True)
    tc = config.Train(**settings)
    calls = []

    def timer(prec, model=None):
        name = prec if model is None else f"compiled_{prec}"
        calls.append(name)
        return planted[name]

    runtime, compiled = autotune.choose(tc, config.Model(), CPU, None, lambda: "compiled model", steps_left, timer=timer)
    return runtime, compiled, calls


@pytest.mark.parametrize("fp32, bf16, expected", [(2.0, 1.0, "bf16"), (1.0, 2.0, "fp32"),
                                                  (1.0, 0.97, "fp32")])  # within the margin: the simpler one
def test_auto_trains_in_the_precision_the_timings_say_is_faster(machine, fp32, bf16, expected):
    runtime, _, calls = choose({"fp32": fp32, "bf16": bf16, "compiled_fp32": 9.0, "compiled_bf16": 9.0})
    assert runtime.precision == expected
    assert {"fp32", "bf16"} <= set(calls)
    assert "measured" in runtime.why["precision"] and f"bf16 {bf16:.3g} s/step" in runtime.why["precision"]


def test_compile_is_kept_only_where_measurably_faster(machine):
    runtime, compiled, _ = choose({"fp32": 1.0, "bf16": 2.0, "compiled_fp32": 0.8})
    assert runtime.compile is True and compiled == "compiled model"
    runtime, compiled, _ = choose({"fp32": 1.0, "bf16": 2.0, "compiled_fp32": 1.1}, precision="fp32")
    assert runtime.compile is False and compiled is None


def test_a_short_run_never_compiles(machine):
    runtime, compiled, calls = choose({"fp32": 1.0, "bf16": 2.0, "compiled_fp32": 0.1}, steps_left=100)
    assert runtime.compile is False and compiled is None
    assert "compiled_fp32" not in calls and "too short to compile" in runtime.why["compile"]


def test_explicit_settings_are_obeyed_and_nothing_is_measured(machine):
    runtime, compiled, calls = choose({}, precision="bf16", compile="false")
    assert (runtime.precision, runtime.compile, calls) == ("bf16", False, [])


def test_a_resumed_run_keeps_its_settings_and_the_reason_it_started_with(machine):
    started, _, _ = choose({"fp32": 1.0, "bf16": 0.5, "compiled_bf16": 0.3})
    resumed, compiled = autotune.choose(config.Train(), config.Model(), CPU, None, lambda: "c", 10_000,
                                        saved=started.to_dict(), timer=lambda *a: pytest.fail("a resumed run measured"))
    assert (resumed.precision, resumed.compile, compiled) == ("bf16", True, "c")
    assert resumed.why["compile"] == "as the run started: auto, measured: eager 0.5 s/step, compiled 0.3 s/step"
    again, _ = autotune.choose(config.Train(), config.Model(), CPU, None, lambda: "c", 10_000, saved=resumed.to_dict())
    assert again.why == resumed.why  # a second resume does not stack the prefix
    explicit, _, _ = choose({}, precision="fp32", compile="false")  # started with explicit settings, resumed at auto
    resumed, _ = autotune.choose(config.Train(), config.Model(), CPU, None, lambda: "c", 10_000, saved=explicit.to_dict())
    assert (resumed.precision, resumed.compile, resumed.why) == ("fp32", False, {"precision": "as the run started",
                                                                                 "compile": "as the run started"})


def test_timings_are_cached_per_machine_and_model(machine):
    planted = {"fp32": 1.0, "bf16": 0.5, "compiled_bf16": 0.3}
    first, _, calls = choose(planted)
    assert sorted(calls) == ["bf16", "compiled_bf16", "fp32"]
    second, _, calls = choose(planted, keep_cache=True)
    assert calls == [] and (second.precision, second.compile) == ("bf16", True)
    assert "cached" in second.why["precision"]
    other, _ = autotune.choose(config.Train(), config.Model(name="resnet34"), CPU, None, lambda: "c", 10_000,
                               timer=lambda p, m=None: 1.0)
    assert other.why["precision"].startswith("auto, measured")  # another model: measured, not taken from resnet32
    key = lambda **kw: autotune.cache_key(config.Model(), 32, True, 1, **{"compile_mode": "default", "task": "10 classes, loss ce", **kw})
    # another compile mode, number of classes or loss is another step to time
    assert len({key(), key(compile_mode="max-autotune"), key(task="100 classes, loss ce"), key(task="10 classes, loss ldam")}) == 4


def test_a_folder_runs_image_size_is_another_step_to_time(machine):
    # 32 px and 224 px folder runs of one model and batch must not share timings; CIFAR is 32 px
    # whatever data.image_size says
    keys = []
    for dataset, size in (("folder", 32), ("folder", 224), ("cifar10", 224)):
        cfg = config.build(overrides=[("data.dataset", dataset), ("data.image_size", size)])
        seen = []
        def choose(tc, model_cfg, ctx, *a, image_size=32, **k):
            seen.append(autotune.cache_key(model_cfg, 32, True, 1, image_size=image_size))
            raise StopIteration
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(autotune, "choose", choose)
            with pytest.raises(StopIteration):
                build.training(cfg, CPU, [10, 1], SimpleNamespace(steps=lambda epoch: 1))
        keys += seen
    assert keys[0] != keys[1] and keys[0] == keys[2] and "224 px" in keys[1]


def plant(cache_dir, fp32, bf16):
    """The timing cache train.py reads for the TINY runs below (1 thread, batch 32, resnet8, channels_last)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # conftest.run gives the subprocess OMP_NUM_THREADS=1
    try:
        key = autotune.cache_key(config.Model(name="resnet8"), 32, True, 1, "default", "10 classes, loss ce")
    finally:
        torch.set_num_threads(threads)
    cache_dir.mkdir(exist_ok=True)
    (cache_dir / "autotune.json").write_text(json.dumps({key: {"fp32": fp32, "bf16": bf16}}))


def auto(args):
    """TINY with precision back at auto (compile stays off: a one-epoch run would never compile anyway)."""
    i = args.index("train.precision=fp32")
    return args[:i] + ["train.precision=auto"] + args[i + 1:]


def test_train_py_follows_planted_timings_and_a_resumed_run_keeps_its_precision(fake_root, tmp_path):
    cache = tmp_path / "cache"
    env = {"LA_CACHE_DIR": str(cache)}
    plant(cache, fp32=2.0, bf16=1.0)
    out = tmp_path / "run"
    proc = run([REPO / "train.py", "--data-root", fake_root, "--out", out, "--epochs", "1"] + auto(TINY), tmp_path, env=env)
    assert "precision bf16 (auto, cached: fp32 2 s/step, bf16 1 s/step)" in proc.stdout
    assert json.loads((out / "runtime.json").read_text())["precision"] == "bf16"

    plant(cache, fp32=1.0, bf16=2.0)  # the machine changed its mind: a started run keeps its precision
    proc = run([REPO / "train.py", "--data-root", fake_root, "--out", out, "--epochs", "2", "--resume"] + auto(TINY),
               tmp_path, env=env)
    assert "precision bf16 (as the run started: auto, cached: fp32 2 s/step, bf16 1 s/step)" in proc.stdout
    assert json.loads((out / "runtime.json").read_text())["why"]["precision"].endswith("fp32 2 s/step, bf16 1 s/step")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["runtime"]["precision"] == "bf16"


def test_measuring_leaves_the_run_as_an_explicit_setting_would_train_it(fake_root, tmp_path):
    env = {"LA_CACHE_DIR": str(tmp_path / "empty_cache")}
    common = [REPO / "train.py", "--data-root", fake_root, "--epochs", "1"]
    run(common + ["--out", tmp_path / "auto"] + auto(TINY), tmp_path, env=env)
    chosen = json.loads((tmp_path / "auto" / "runtime.json").read_text())
    assert "measured" in chosen["why"]["precision"]
    explicit = TINY[:TINY.index("train.precision=fp32")] + [f"train.precision={chosen['precision']}"] \
        + TINY[TINY.index("train.precision=fp32") + 1:]
    run(common + ["--out", tmp_path / "explicit"] + explicit, tmp_path, env=env)
    timing = {"seconds", "img_per_s", "eval_seconds"}
    lines = {name: [{k: v for k, v in json.loads(l).items() if k not in timing}
                    for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("auto", "explicit")}
    assert lines["auto"] == lines["explicit"]
    a, b = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True) for name in ("auto", "explicit"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x["momentum_buffer"], y["momentum_buffer"])
               for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()))
