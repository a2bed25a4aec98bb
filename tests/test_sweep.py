"""scripts/sweep_table.py's arithmetic on hand-written results, and scripts/sweep_rho.sh end to end on tiny data."""
import csv
import importlib.util
import json
import os
import sys

from conftest import REPO, TINY_EXTRA, run

spec = importlib.util.spec_from_file_location("sweep_table", REPO / "scripts" / "sweep_table.py")
sweep_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep_table)


def write_eval(runs, name, loss, raw, posthoc=None, finished=True):
    test = {"raw": {"top1": raw, "balanced_acc": raw}}
    if posthoc is not None:
        test["posthoc"] = {"tau": 1.0, "top1": posthoc, "balanced_acc": posthoc}
    (runs / name).mkdir(parents=True)
    report = {"loss": loss, "test": test, "evaluated_with": {"git_commit": "e" * 40, "git_dirty": False}}
    if finished is not None:  # None: an eval.json from before `finished` was recorded
        report["finished"] = finished
    (runs / name / "eval.json").write_text(json.dumps(report))


def table(tmp_path, seeds, *flags):
    """Run the aggregator over rho 100 (two seeds evaluated) and rho 10 (nothing); return (markdown rows, csv rows)."""
    out = tmp_path / f"results_{len(seeds.split())}{''.join(flags)}"
    sweep_table.main(["--dataset", "cifar10", "--runs", str(tmp_path / "runs"), "--rhos", "100 10",
                      "--seeds", seeds, "--out", str(out), *flags])
    md = (out / "cifar10_rho_sweep.md").read_text()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    rows = {r[0]: r[1:] for r in cells}
    with open(out / "cifar10_rho_sweep.csv") as f:
        return rows, {(r["method"], r["rho"]): r for r in csv.DictReader(f)}, md


def test_table_mean_std_and_missing(tmp_path):
    runs = tmp_path / "runs"
    for seed, (ce, posthoc, la) in enumerate([(70.0, 74.0, 76.0), (71.0, 75.5, 77.0)]):
        write_eval(runs, f"rho100_ce_s{seed}", "ce", ce, posthoc)
        write_eval(runs, f"rho100_la_s{seed}", "la", la)

    rows, cells, md = table(tmp_path, "0 1")
    assert rows["Baseline"][0] == "70.50 ± 0.71 (n=2; seed 77.54; paper 72.84)"  # std with ddof=1: sqrt(0.5)
    assert rows["Post-hoc adjustment"][0] == "74.75 ± 1.06 (n=2; seed 80.67; paper 77.40)"
    assert rows["Loss adjustment"][0] == "76.50 ± 0.71 (n=2; seed 80.26; paper 77.67)"
    assert rows["Baseline"][1] == "— (seed 89.39)"  # rho=10 never ran: missing, not 0
    assert float(cells["Post-hoc adjustment", "100"]["mean"]) == 74.75
    assert float(cells["Post-hoc adjustment", "100"]["std"]) == round(2 ** -0.5 * 1.5, 4)
    assert cells["Loss adjustment", "100"]["n"] == "2"
    assert cells["Loss adjustment", "100"]["paper_published"] == "77.67"
    assert cells["Baseline", "10"] == {"method": "Baseline", "rho": "10", "mean": "", "std": "", "n": "0", "unfinished": "0",
                                       "seed_published": "89.39", "paper_published": ""}
    assert "evaluated at eeeeeee," in md and "trained at not recorded" in md  # the commits come from the run files

    rows, cells, _ = table(tmp_path, "0 1 2")  # a third seed asked for but not finished: say so
    assert rows["Baseline"][0] == "70.50 ± 0.71 (n=2/3; seed 77.54; paper 72.84)"
    assert cells["Baseline", "100"]["n"] == "2"


def test_unfinished_runs_are_marked_and_left_out_unless_asked(tmp_path):
    runs = tmp_path / "runs"
    write_eval(runs, "rho100_ce_s0", "ce", 70.0, 74.0)
    write_eval(runs, "rho100_ce_s1", "ce", 50.0, 60.0, finished=False)  # stopped at epoch 64 of 200, say
    write_eval(runs, "rho100_la_s0", "la", 76.0)
    write_eval(runs, "rho100_la_s1", "la", 77.0, finished=None)  # an old eval.json: metrics.jsonl and config.yaml tell
    (runs / "rho100_la_s1" / "config.yaml").write_text("train:\n  epochs: 3\n")
    (runs / "rho100_la_s1" / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)))

    rows, cells, md = table(tmp_path, "0 1")
    assert rows["Baseline"][0] == "70.00 (n=1/2; 1 unfinished left out; seed 77.54; paper 72.84)"
    assert rows["Loss adjustment"][0] == "76.50 ± 0.71 (n=2; seed 80.26; paper 77.67)"
    assert (cells["Baseline", "100"]["mean"], cells["Baseline", "100"]["n"], cells["Baseline", "100"]["unfinished"]) == \
        ("70.0", "1", "1")
    assert "left out" in md

    rows, cells, _ = table(tmp_path, "0 1", "--include-unfinished")
    assert rows["Baseline"][0] == "60.00 ± 14.14 (n=2; 1 unfinished included; seed 77.54; paper 72.84)"
    assert cells["Baseline", "100"]["n"] == "2"

    (runs / "rho100_la_s1" / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")  # the old run stopped early
    rows, _, _ = table(tmp_path, "0 1")
    assert rows["Loss adjustment"][0] == "76.00 (n=1/2; 1 unfinished left out; seed 80.26; paper 77.67)"


def sweep_env(fake_root, tmp_path, name, **more):
    return {"DATA_ROOT": str(fake_root), "RHOS": "10", "SEEDS": "0", "EPOCHS": "1", "PYTHON": sys.executable,
            "OUT": str(tmp_path / f"runs_{name}"), "RESULTS": str(tmp_path / f"results_{name}"), "OMP_NUM_THREADS": "1",
            "EXTRA": TINY_EXTRA, **more}


def run_outcome(run_dir):
    """What a run learned: its metrics lines without timings, its weights, its test results."""
    import torch

    timing = {"seconds", "img_per_s", "eval_seconds"}
    metrics = [{k: v for k, v in json.loads(l).items() if k not in timing}
               for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return metrics, torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"], \
        json.loads((run_dir / "eval.json").read_text())["test"]


def test_sweep_script_end_to_end_one_at_a_time_and_in_parallel(tmp_path, fake_root):
    import torch

    env = sweep_env(fake_root, tmp_path, "p1")
    proc = run(["bash", REPO / "scripts" / "sweep_rho.sh"], cwd=tmp_path, env=env, timeout=120)
    results = tmp_path / "results_p1"
    for suffix in ("md", "csv", "png"):
        assert (results / f"cifar10_rho_sweep.{suffix}").is_file()
    md = (results / "cifar10_rho_sweep.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0] for r in rows] == ["| Baseline", "| Post-hoc adjustment", "| Loss adjustment"]
    assert "—" not in "".join(rows)  # every run finished and was evaluated
    assert "epochs 1" in md and "Baseline" in proc.stdout and "1 run(s) at once" in proc.stdout
    with open(results / "cifar10_rho_sweep.csv") as f:
        assert [r["n"] for r in csv.DictReader(f)] == ["1", "1", "1"]

    # PARALLEL=2 trains CE and LA side by side; each must be the run it would have been alone
    par = sweep_env(fake_root, tmp_path, "p2", PARALLEL="2")
    proc = run(["bash", REPO / "scripts" / "sweep_rho.sh"], cwd=tmp_path, env=par, timeout=120)
    assert "2 run(s) at once" in proc.stdout
    assert (tmp_path / "runs_p2" / "rho10_ce_s0.log").read_text().count("epoch   1/1") == 1  # its own log
    for loss in ("ce", "la"):
        (m1, w1, e1), (m2, w2, e2) = (run_outcome(tmp_path / f"runs_{p}" / f"rho10_{loss}_s0") for p in ("p1", "p2"))
        assert len(m1) == 1 and m1 == m2 and e1 == e2, loss
        assert all(torch.equal(w1[k], w2[k]) for k in w1), loss
    # Running the sweep again passes --resume to a run with a checkpoint (the second gpu_job.sh call below), and
    # train.py --resume leaves a finished run as it is (test_end_to_end.py, test_a_resume_writes_the_metrics_line_...).


def test_a_second_sweep_into_the_same_out_stops_at_once(tmp_path, fake_root):
    import fcntl

    env = sweep_env(fake_root, tmp_path, "twice")
    (tmp_path / "runs_twice").mkdir()
    with open(tmp_path / "runs_twice" / ".sweep.lock", "w") as held:  # the first sweep, still running
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242 on host h since then\n")
        held.flush()
        proc = run(["bash", REPO / "scripts" / "sweep_rho.sh"], cwd=tmp_path, env=env, check=False, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"another sweep is running into {env['OUT']} (pid 4242 on host h since then); wait for it to end, or pass another OUT"]
    assert os.listdir(env["OUT"]) == [".sweep.lock"]  # no run trained, none started


def test_parallel_must_be_a_count(tmp_path):
    proc = run(["bash", REPO / "scripts" / "sweep_rho.sh"], cwd=tmp_path, env={"PARALLEL": "two"}, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "PARALLEL must be a positive integer, not 'two'"


def test_time_limit_stops_training_and_still_tabulates(tmp_path, fake_root):
    env = sweep_env(fake_root, tmp_path, "limit", TIME_LIMIT="1")
    proc = run(["bash", REPO / "scripts" / "sweep_rho.sh"], cwd=tmp_path, env=env, timeout=120)
    assert proc.stdout.count("stopped by TIME_LIMIT=1 s, not evaluated") == 2
    assert not list((tmp_path / "runs_limit").glob("*/eval.json"))
    assert "| Baseline | — (seed 89.39) |" in (tmp_path / "results_limit" / "cifar10_rho_sweep.md").read_text()


def stand_in_gpu(tmp_path):
    """A bin/ folder whose nvidia-smi names a GPU and whose nvidia-cuda-mps-control forks at once (as the real
    daemon does before its server has started) and logs what it is told to mps.log."""
    bin_dir, log = tmp_path / "bin", tmp_path / "mps.log"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Stand-in GPU (UUID: GPU-0)'\n")
    (bin_dir / "nvidia-cuda-mps-control").write_text(
        f"#!/bin/sh\nif [ \"$1\" = -d ]; then echo \"start $CUDA_MPS_PIPE_DIRECTORY\" >> {log}; exit 0; fi\n"
        f"read cmd; echo \"$cmd $CUDA_MPS_PIPE_DIRECTORY\" >> {log}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, log


def test_mps_whose_client_fails_is_stopped_and_unset(tmp_path):
    """The control daemon forks, but its server cannot serve a CUDA client: stopped, unset, said; one that can
    serve is kept and stopped when the script exits."""
    env, log = stand_in_gpu(tmp_path)
    env["TMPDIR"] = str(tmp_path)
    script = f"source {REPO / 'scripts' / 'mps.sh'}; mps_start; echo \"on=$MPS_ON pipe=${{CUDA_MPS_PIPE_DIRECTORY:-unset}}\""
    failing = "echo 'RuntimeError: CUDA error: all CUDA-capable devices are busy or unavailable' >&2; exit 1"
    proc = run(["bash", "-c", script], cwd=tmp_path, env={**env, "MPS_PROBE": failing})
    assert "a CUDA client could not run under it (RuntimeError: CUDA error: all CUDA-capable devices are busy" in proc.stdout
    assert proc.stdout.strip().endswith("on=0 pipe=unset")
    started, stopped = log.read_text().splitlines()
    assert started.startswith("start ") and stopped == "quit " + started.split()[1]  # that very daemon
    assert not list(tmp_path.glob("la-mps.*"))

    log.unlink()
    proc = run(["bash", "-c", script], cwd=tmp_path, env={**env, "MPS_PROBE": "true"})
    assert "CUDA MPS started" in proc.stdout and "on=1 pipe=" + str(tmp_path / "la-mps.") in proc.stdout
    assert [l.split()[0] for l in log.read_text().splitlines()] == ["start", "quit"]  # stopped at exit
    assert not list(tmp_path.glob("la-mps.*"))


def test_a_failed_run_is_counted_and_the_sweep_goes_on_one_at_a_time(tmp_path, fake_root):
    env = sweep_env(fake_root, tmp_path, "fail")
    (tmp_path / "runs_fail" / "rho10_ce_s0").mkdir(parents=True)
    (tmp_path / "runs_fail" / "rho10_ce_s0" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    proc = run(["bash", REPO / "scripts" / "sweep_rho.sh"], cwd=tmp_path, env=env, check=False, timeout=120)
    assert proc.returncode == 1 and "1 run(s) failed" in proc.stderr
    assert (tmp_path / "runs_fail" / "rho10_la_s0" / "eval.json").is_file()  # trained after the failed one


def test_gpu_job_packs_every_run_and_a_second_call_continues_them(tmp_path, fake_root):
    """scripts/gpu_job.sh on CPU. A first call with a relative ARCHIVE_DIR and WORK, a stand-in GPU whose MPS serves
    clients, a --concurrent benchmark and CHECKPOINTS=1: one daemon for bench.py and the sweep, two runs at once,
    evaluated, tabulated and packed into one small archive with their checkpoints. A second call on a fresh work
    folder (a new machine) with RESUME_FROM that archive resumes a run instead of starting it over (a run longer
    than one GPU command) and, without CHECKPOINTS, packs no checkpoint."""
    import tarfile

    gpu, log = stand_in_gpu(tmp_path)
    bench = "--synthetic --device cpu --compile false --precision fp32 --batch-size 16 --windows 1 --window-steps 1 " \
            "--warmup-steps 0 --concurrent 1"
    common = {"DATA_ROOT": str(fake_root), "RHOS": "10", "SEEDS": "0", "PYTHON": sys.executable,
              "EXTRA": TINY_EXTRA}
    env = {**common, "EPOCHS": "1", "PARALLEL": "2", "WORK": "work", "ARCHIVE_DIR": "out", "BENCH": bench,
           "CHECKPOINTS": "1", "MPS_PROBE": "true", "TMPDIR": str(tmp_path), **gpu}
    proc = run(["bash", REPO / "scripts" / "gpu_job.sh"], cwd=tmp_path, env=env, timeout=240)
    assert "packed" in proc.stdout
    assert proc.stdout.count("CUDA MPS started") == 1 and "using the CUDA MPS daemon at" in proc.stdout
    assert proc.stdout.index("CUDA MPS started") < proc.stdout.index("measuring 1 run(s) at once")
    assert [l.split()[0] for l in log.read_text().splitlines()] == ["start", "quit"]
    first = tmp_path / "out" / "results.tar.gz"
    with tarfile.open(first) as tar:
        names = set(tar.getnames())
        bench_json = json.load(tar.extractfile("./bench.json"))
    for loss in ("ce", "la"):
        for f in ("config.yaml", "split.json", "runtime.json", "metrics.jsonl", "eval.json", "eval.log",
                  "checkpoint.pt", "provenance.json"):
            assert f"./runs/rho10_{loss}_s0/{f}" in names
        assert f"./runs/rho10_{loss}_s0.log" in names
    assert {"./job.log", "./cifar10_rho_sweep.md", "./cifar10_rho_sweep.csv"} <= names
    assert bench_json["mps"] is False  # a CPU benchmark's work never went through the daemon

    job = lambda name, **more: run(["bash", REPO / "scripts" / "gpu_job.sh"], cwd=tmp_path, check=False, timeout=180,
                                   env={**common, "LOSSES": "la", "WORK": str(tmp_path / name),
                                        "ARCHIVE_DIR": str(tmp_path / name / "out"), **more})
    second = job("second", EPOCHS="2", RESUME_FROM=str(first))
    assert second.returncode == 0 and "rho10_la_s0: training (--resume)" in second.stdout
    with tarfile.open(tmp_path / "second" / "out" / "results.tar.gz") as tar:
        lines = tar.extractfile("./runs/rho10_la_s0/metrics.jsonl").read().decode().splitlines()
        assert not any(n.endswith(".pt") for n in tar.getnames())
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2]  # epoch 1 from the first call, epoch 2 resumed
    plain = tmp_path / "plain.tar.gz"
    with tarfile.open(plain, "w:gz") as tar:
        tar.add(tmp_path / "work" / "job.log", "./job.log")
    refused = job("third", RESUME_FROM=str(plain))
    assert refused.returncode == 2 and "holds no checkpoint (was it packed with CHECKPOINTS=1?)" in refused.stderr


def test_gpu_job_whose_benchmark_fails_exits_non_zero_and_still_packs(tmp_path, fake_root):
    """A benchmark-only job whose bench.py fails was reported as a success (exit 0): the CPU dry run of the GPU
    queue's job 1 found it."""
    env = {"DATA_ROOT": str(fake_root), "RHOS": "", "PYTHON": sys.executable, "WORK": "work", "ARCHIVE_DIR": "out",
           "BENCH": "--no-such-flag", "MPS": "0"}
    proc = run(["bash", REPO / "scripts" / "gpu_job.sh"], cwd=tmp_path, env=env, check=False, timeout=120)
    assert proc.returncode == 2 and "bench.py failed: exit 2" in proc.stdout
    assert "packed" in proc.stdout and (tmp_path / "out" / "results.tar.gz").is_file()


def test_gpu_job_without_data_says_so(tmp_path):
    proc = run(["bash", REPO / "scripts" / "gpu_job.sh"], cwd=tmp_path, check=False,
               env={"ARCHIVE_DIR": str(tmp_path / "out"), "DATA_ROOT": str(tmp_path / "nothing")})
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("set DATA_ROOT to it, or PACK to a folder with unpack.py")


def test_rundir_says_whether_a_run_finished(tmp_path):
    """What reproduce_gpu.sh asks (`python -m la.rundir finished RUN`) instead of grepping config.yaml."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("data:\n  rho: 100\ntrain:\n  batch_size: 128\n  epochs: 2\n")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    finished = lambda: run([sys.executable, "-m", "la.rundir", "finished", run_dir], cwd=tmp_path, check=False).returncode
    assert finished() == 1
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2)))
    assert finished() == 0
    assert run([sys.executable, "-m", "la.rundir", "finished", tmp_path / "nowhere"], cwd=tmp_path, check=False).returncode == 1
