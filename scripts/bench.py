"""Training throughput, in images per second, of three pipelines on one machine in one run.

    python scripts/bench.py                                  # CUDA when available, CIFAR-10-LT rho=100
    python scripts/bench.py --device cpu --json results/bench_cpu.json
    python scripts/bench.py --device cpu --compile false --json results/bench_cpu_eager.json
    python scripts/bench.py --concurrent 1 2 4 8            # aggregate (b) of K runs training at once
    python scripts/bench.py --model resnet34 --bn-batch 16  # the seed recipe's network and batch norm
    python scripts/bench.py --config configs/official_cifar10.yaml  # the authors' TF recipe: network, inputs, epochs
    python scripts/bench.py --dataset folder --model resnet50 --workers 8   # your own images (la/data/folder.py)

(a) reference: the LDAM-DRW-style pipeline: fp32, NCHW, PIL RandomCrop/Flip/ToTensor/Normalize in
    2 DataLoader workers (la.data.cifar.TorchvisionLoader).
(b) train:     train.py's loop, la.engine.train_epoch, at the recipe defaults: uint8 data on the device with batched tensor
    augmentation (la.data.cifar.TensorLoader), precision 'auto', channels_last, compile 'auto', cuda_graph 'auto'
    (on a CPU, 'auto' times the candidates as train.py does: la.autotune). On a CPU, (b) is also measured at
    every fixed precision and compile setting (--grid), so the figure shows what 'auto' chose and what it left.
(c) bare step: (b)'s model, precision, compilation, CUDA graph and optimizer step on one fixed, pre-normalised batch:
    no data pipeline, no bookkeeping, so (b)/(c) says how much those cost. It is a reference, not a bound: timed
    apart, (b) has measured 1-2 % above it (BENCHMARKS.md), and compiled (c) has landed in two modes 20 % apart.

--concurrent K [K ...] measures instead the aggregate images per second of K copies of (b) training at the same
time on the one device, as `PARALLEL=K scripts/sweep_rho.sh` trains them (K processes; start CUDA MPS first
to let their kernels overlap: scripts/mps.sh), and the full runs per hour that follow.

Each figure is the median of timed windows after warm-up. Windows run on across epoch boundaries, so
per-epoch costs (a new permutation, the reference's DataLoader worker start-up) land in the windows
that meet them; the median then shows the steady state, and 'overall' (all windows' images / all
windows' seconds) keeps those costs in.

--dataset folder measures instead the image-file path (la.data.folder.FolderLoader) on generated 256 x 256 JPEGs:
the loader alone (decode, RandomResizedCrop, flip, batching) in the main process (0 workers: one core's rate) and
with --workers DataLoader workers, then train.py's loop fed by it (fp32, uncompiled).
"""
import argparse
import dataclasses
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere, like train.py

from la import UserError, run_cli, build, config, data, dist, engine, hardware, models, provenance  # noqa: E402
from la.runtime import resolve_cuda_graph  # noqa: E402

PUBLISHED_GFLOP_RESNET32 = 0.41  # the published figure per training image (docs/reference.md), a cross-check in the JSON


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", help="default: $LA_DATA_ROOT, else ./data (config.data_root)")
    p.add_argument("--synthetic", action="store_true", help="random uint8 images of CIFAR shape instead of CIFAR")
    p.add_argument("--rho", type=float, default=100.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--window-steps", type=int, default=20)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--config", help="a recipe (configs/*.yaml): its model, input pipeline and epochs (the run-time "
                   "estimates); default: la/config.py's defaults, the paper recipe")
    p.add_argument("--model", choices=tuple(models.MODELS), help="default: the recipe's (resnet32 in the paper recipe)")
    p.add_argument("--loss", choices=config.CHOICES["loss.name"], default="la",
                   help="ldam trains the cosine classifier, as train.py does")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="of (b) and (c); (a) is fp32")
    p.add_argument("--compile", choices=config.CHOICES["train.compile"], default="auto",
                   help="torch.compile of (b) and (c), as train.compile; (a) is never compiled")
    p.add_argument("--compile-mode", choices=config.CHOICES["train.compile_mode"], default="default",
                   help="torch.compile's mode, as train.compile_mode")
    p.add_argument("--cuda-graph", choices=config.CHOICES["train.cuda_graph"], default="auto",
                   help="record (b)'s and (c)'s step as one CUDA graph, as train.cuda_graph; (a) never is")
    p.add_argument("--bn-batch", type=int, default=0, help="model.bn_batch: batch norm over groups of N training images")
    p.add_argument("--grid", choices=("auto", "yes", "no"), default="auto",
                   help="also measure (b) at every fixed precision and compile setting (auto: on a CPU)")
    p.add_argument("--concurrent", type=int, nargs="+", metavar="K", help="instead: K runs at once, for each K given")
    p.add_argument("--skip-reference", action="store_true", help="do not measure (a)")
    p.add_argument("--dataset", choices=("cifar", "folder"), default="cifar",
                   help="folder: the image-file loader on generated JPEGs instead of the figures above")
    p.add_argument("--images", type=int, default=512, help="--dataset folder: how many JPEGs to generate")
    p.add_argument("--image-size", type=int, default=224, help="--dataset folder: data.image_size (the crop)")
    p.add_argument("--workers", type=int, default=2, help="--dataset folder: DataLoader workers, besides 0")
    p.add_argument("--json", help="default: results/bench_{device}.json (--dataset folder: bench_folder_{device}.json)")
    args = p.parse_args(argv)
    if min(args.windows, args.window_steps, args.batch_size, *(args.concurrent or [1])) < 1 or min(args.warmup_steps, args.bn_batch) < 0:
        p.error("--windows, --window-steps, --batch-size and --concurrent must be >= 1, --warmup-steps and --bn-batch >= 0")
    return args


# ---------------------------------------------------------------- data

def has_cifar(root, dataset):
    folder, train_files, test_files = data.LAYOUT[dataset][:3]
    return all((Path(root) / folder / n).is_file() for n in train_files + test_files)


def synthetic_train_set(dc):
    """Random images with the real subset's labels and size: the same split functions on CIFAR's label layout."""
    n_classes = data.num_classes(dc.dataset)
    labels = np.repeat(np.arange(n_classes), 50_000 // n_classes)  # CIFAR's training set is balanced
    idx = data.longtail_indices(labels, data.class_counts(n_classes, 50_000 // n_classes, dc.rho, dc.profile), dc.subset_seed)
    idx, _ = data.carve_validation(labels, idx, dc.val_per_class, dc.subset_seed)
    x = np.random.RandomState(0).randint(0, 256, size=(len(idx), 3, 32, 32), dtype=np.uint8)
    return x, labels[idx]


def train_set(cfg, synthetic):
    """(x, y, source): the long-tailed training subset exactly as train.py builds it, or a synthetic stand-in."""
    if synthetic:
        return (*synthetic_train_set(cfg.data), "synthetic (--synthetic)")
    if not has_cifar(cfg.data.root, cfg.data.dataset):
        print(f"note: no {cfg.data.dataset} under {Path(cfg.data.root).resolve()}; using synthetic images (pass --data-root)")
        return (*synthetic_train_set(cfg.data), "synthetic (data missing)")
    splits = data.prepare(cfg.data)
    return splits.train_x, splits.train_y, f"{cfg.data.dataset} at {Path(cfg.data.root).resolve()}"


def endless(loader):
    """Batches across epoch boundaries, as train.py's epochs follow one another."""
    for epoch in itertools.count():
        yield from loader.batches(epoch)


# ---------------------------------------------------------------- what is timed

def training(ctx, loader, prec=None, compiled=None, graph=None, channels_last=True):
    """The training objects exactly as train.py builds them (la.build), from the same weights for every figure
    (train.seed); at the given precision, compile and CUDA-graph settings, or at the recipe's ('auto')."""
    fixed = {"precision": prec, "compile": None if compiled is None else str(compiled).lower(),
             "cuda_graph": None if graph is None else str(graph).lower()}
    tc = dataclasses.replace(ctx["cfg"].train, channels_last=channels_last,
                             **{k: v for k, v in fixed.items() if v is not None})
    cfg = dataclasses.replace(ctx["cfg"], train=tc)
    counts = np.bincount(ctx["y"], minlength=ctx["n_classes"]).tolist()
    return build.training(cfg, dist.Context(0, 0, 1, ctx["device"]), counts, loader)


def loop(t, batches, device):
    """(b): run(n) takes n steps of train.py's loop, la.engine.train_epoch (the step, the schedule, the running
    sums, the stop and non-finite checks), and returns the images they held."""
    meter = engine.Meter(device)

    def run(n):
        sizes = []

        def window():
            for x, y in itertools.islice(batches, n):
                sizes.append(len(y))  # the last batch of an epoch is short
                yield x, y
        engine.train_epoch(t, window(), meter)
        return sum(sizes)
    return run


def bare(t, batch):
    """(c): run(n) takes n training steps on one batch, nothing around them."""
    def run(n):
        for _ in range(n):
            t.step(*batch)
        return n * len(batch[1])
    return run


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run, args, device):
    """Images per second of each timed window, after warm-up steps that are not timed."""
    run(args.warmup_steps)
    rates, seconds, images = [], 0.0, 0
    for _ in range(args.windows):
        sync(device)
        t0 = time.perf_counter()
        n = run(args.window_steps)
        sync(device)
        dt = time.perf_counter() - t0
        rates.append(n / dt)
        seconds, images = seconds + dt, images + n
    return {"img_per_s": statistics.median(rates), "overall_img_per_s": images / seconds, "windows": rates}


# ---------------------------------------------------------------- the three figures

def bench_reference(ctx, args):
    loader = data.TorchvisionLoader(ctx["x"], ctx["y"], args.batch_size, 0, 1, ctx["cfg"].train.seed, ctx["device"],
                                    channels_last=False, augment=True, workers=2)
    t = training(ctx, loader, "fp32", False, False, channels_last=False)
    batches = endless(loader)
    try:
        return measure(loop(t, batches, ctx["device"]), args, ctx["device"])
    finally:
        batches.close()  # stop the DataLoader workers before they steal cores from the next figure


def tensor_loader(ctx, args):
    dc = ctx["cfg"].data
    return data.TensorLoader(ctx["x"], ctx["y"], args.batch_size, 0, 1, ctx["cfg"].train.seed, ctx["device"],
                             channels_last=True, augment=True, crop_pad=dc.crop_pad, normalize=dc.normalize,
                             drop_last=dc.drop_last)


def compiled_training(ctx, args, prec, compiled, graph):
    """(loader, Training); a compiled step has compiled both its graphs (the full batch's and an epoch's short last
    batch's) before any window, as they are in a run after its first epoch."""
    loader = tensor_loader(ctx, args)
    t = training(ctx, loader, prec, compiled, graph)
    if compiled:
        *_, last = loader.batches(0)
        t.step(*last)
    return loader, t


def bench_train(ctx, args, prec, compiled, graph):
    loader, t = compiled_training(ctx, args, prec, compiled, graph)
    return measure(loop(t, endless(loader), ctx["device"]), args, ctx["device"])


def bench_ceiling(ctx, args, prec, compiled, graph):
    loader, t = compiled_training(ctx, args, prec, compiled, graph)
    batch = next(loader.batches(0))  # already augmented, normalised, channels_last, on the device
    return measure(bare(t, batch), args, ctx["device"])


def resolve_defaults(ctx, args):
    """What train.py would train a full run of this recipe in: la.autotune's choice (measured or cached on a CPU)."""
    return training(ctx, tensor_loader(ctx, args)).runtime


def grid(ctx, args):
    """Every fixed (precision, compiled) setting this machine can run, for (b) beside the defaults; a setting
    given on the command line (--precision, --compile) is not varied."""
    if ctx["device"].type != "cpu" and args.grid != "yes" or args.grid == "no":
        return []
    cuda = ctx["device"].type == "cuda"
    precs = ["fp32"] + (["bf16"] if cuda or hardware.cpu_runs_bf16() else [])
    compiles = [False] + ([True] if cuda or hardware.cxx_compiler() else [])
    precs = precs if args.precision == "auto" else [args.precision]
    compiles = compiles if args.compile == "auto" else [args.compile == "true"]
    return [(p, c) for p in precs for c in compiles]


# ---------------------------------------------------------------- --dataset folder

def folder_splits(args, cfg, root):
    """Generated 256 x 256 JPEGs under root, in a 10-class long-tailed folder, read as train.py reads one."""
    sys.path.insert(0, str(REPO / "scripts"))
    import make_toy_folder

    make_toy_folder.make(root, classes=10, head=max(1, args.images * 10 // 39), rho=10, test_per_class=1, size=256,
                         fmt="jpg")  # exp profile at rho 10: 3.9 x head images
    return data.prepare(dataclasses.replace(cfg.data, dataset="folder", root=str(root), image_size=args.image_size,
                                            val_per_class=0))


def bench_folder(args, cfg, device):
    """{figure: measure(...)}: the loader alone at 0 and args.workers workers, and train.py's loop it feeds."""
    import tempfile

    from la.data import folder

    with tempfile.TemporaryDirectory() as tmp:
        splits = folder_splits(args, cfg, Path(tmp))
        make = lambda workers: folder.FolderLoader(splits.train_x, args.batch_size, 0, 1, cfg.train.seed, device,
                                                    True, True, workers)
        batches, cpu = endless(make(0)), time.process_time()
        decoded = sum(len(y) for _, y in itertools.islice(batches, args.windows * args.window_steps))
        per_core = decoded / (time.process_time() - cpu)  # CPU seconds, not wall: a busy machine does not lower it
        batches.close()
        figures = {}
        for workers in sorted({0, args.workers}):
            batches = endless(make(workers))
            figures[f"loader_{workers}_workers"] = measure(lambda n: sum(len(y) for _, y in itertools.islice(batches, n)),
                                                           args, device)
            batches.close()
        ctx = {"cfg": cfg, "device": device, "y": splits.train_y, "n_classes": len(splits.counts)}
        loader = make(args.workers)
        t = training(ctx, loader, "fp32", False, False)
        batches = endless(loader)
        figures["train"] = measure(loop(t, batches, device), args, device)
        batches.close()
    return figures, per_core, len(splits.train_y)


def folder_main(args, cfg, device):
    figures, per_core, n = bench_folder(args, cfg, device)
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(device),
           "data": f"generated 256 x 256 JPEGs (quality 75, colour + noise), {n} images, crop {args.image_size}",
           "dataset": "folder", "train_images": n, "model": cfg.model.name, "batch_size": args.batch_size,
           "workers": args.workers, "windows": args.windows, "window_steps": args.window_steps,
           "warmup_steps": args.warmup_steps, "figures": figures,
           "per_core_decode_img_per_s": per_core, "per_core_source": "loader alone, 0 workers: images / CPU seconds "
           "of the process (decode, RandomResizedCrop, flip, uint8 tensor, collate)"}
    print(f"\n{res['machine']['device_name']}, {res['data']}; {cfg.model.name}, batch {args.batch_size}")
    for name, fig in figures.items():
        print(f"{name:20s} {fig['img_per_s']:9.1f} img/s (overall {fig['overall_img_per_s']:.1f})")
    print(f"one core decodes and augments {per_core:.1f} img/s (per CPU second): a GPU training at R img/s needs "
          f"about R / {per_core:.1f} such cores")
    out = Path(args.json or f"results/bench_folder_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


# ---------------------------------------------------------------- K runs at once

def _concurrent_worker(i, spec, barrier, results):
    """One of K processes: (b) at the given settings, timed between a common start and its own end."""
    torch.set_num_threads(spec["threads"])
    ctx, args = spec["ctx"], spec["args"]
    ctx["device"] = torch.device(ctx["device"])
    loader, t = compiled_training(ctx, args, spec["precision"], spec["compiled"], spec["graph"])
    run = loop(t, endless(loader), ctx["device"])
    run(args.warmup_steps)
    sync(ctx["device"])
    barrier.wait()
    t0 = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
    n = run(args.windows * args.window_steps)
    sync(ctx["device"])
    results.put((i, n, t0, time.monotonic()))


def bench_concurrent(ctx, args, runtime, n_train):
    """For each K: K processes train at once; aggregate images/s over the span from the common start to the
    last one's end, and the full runs per hour that follow."""
    import multiprocessing as mp
    spawn = mp.get_context("spawn")
    rows = []
    for k in args.concurrent:
        threads = max(1, torch.get_num_threads() // k) if ctx["device"].type == "cpu" else torch.get_num_threads()
        spec = {"ctx": {**ctx, "device": str(ctx["device"])}, "args": args, "threads": threads,
                "precision": runtime.precision, "compiled": runtime.compile, "graph": runtime.cuda_graph}
        barrier, results = spawn.Barrier(k), spawn.Queue()
        print(f"measuring {k} run(s) at once ({threads} thread(s) each) ...", flush=True)
        procs = [spawn.Process(target=_concurrent_worker, args=(i, spec, barrier, results)) for i in range(k)]
        for p in procs:
            p.start()
        got = [results.get() for _ in procs]
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise UserError(f"a worker of --concurrent {k} failed (exit {[p.exitcode for p in procs]})")
        span = max(r[3] for r in got) - min(r[2] for r in got)
        aggregate = sum(r[1] for r in got) / span
        rows.append({"k": k, "threads_each": threads, "aggregate_img_per_s": aggregate,
                     "per_run_img_per_s": [r[1] / (r[3] - r[2]) for r in sorted(got)],
                     "full_runs_per_hour": aggregate * 3600 / (n_train * ctx["cfg"].train.epochs)})
    return rows


def gflop_per_image(cfg, n_classes):
    """Forward + backward FLOPs of one training image, counted (convolutions and matmuls) on a batch of 2."""
    model = models.from_config(cfg, n_classes, training=False)  # batch-norm groups do not change the count
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    return counter.get_total_flops() / 2 / 1e9


# ---------------------------------------------------------------- report

def cpu_flags():
    """The CPU features that decide which precision is fast: AVX-512 (with bf16) and AMX."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return sorted(f for f in set(hardware.cpu_flags()) if f in wanted)


def machine(device):
    state = provenance.git_state()
    return {
        "platform": platform.platform(), "processor": platform.processor(), "cpu": hardware.cpu_name(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else hardware.cpu_name(),
        "torch": torch.__version__, "python": platform.python_version(), "git_commit": provenance.short_commit(state), "git_dirty": state["git_dirty"],
    }


def mps_active(device):
    """Whether this process's CUDA work goes through a CUDA MPS daemon: scripts/mps.sh exports
    CUDA_MPS_PIPE_DIRECTORY only once a CUDA client has run under the daemon it started."""
    return device.type == "cuda" and bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))


def derive(figures, gflop, n_train, epochs):
    ratio = lambda a, b: figures[a]["img_per_s"] / figures[b]["img_per_s"] if a in figures and b in figures else None
    ratios = {"train_over_reference": ratio("train", "reference"), "train_over_ceiling": ratio("train", "ceiling")}
    fixed = [n for n in figures if n.startswith("train_")]
    if fixed:  # the defaults against the best fixed setting: what 'auto' left on the table
        ratios["train_over_best_fixed"] = ratio("train", max(fixed, key=lambda n: figures[n]["img_per_s"]))
    estimates = {}
    for name, fig in figures.items():
        if name != "ceiling":
            per_epoch = n_train / fig["img_per_s"]
            estimates[name] = {"seconds_per_epoch": per_epoch, "run_hours": per_epoch * epochs / 3600}
    return {k: v for k, v in ratios.items() if v is not None}, figures["train"]["img_per_s"] * gflop, estimates


LABELS = {"reference": "(a) reference", "train": "(b) train.py loop", "ceiling": "(c) bare step"}


def label(name):
    """'(b) fp32 compiled' for the grid's figures, LABELS otherwise."""
    return LABELS.get(name) or "(b) " + name.removeprefix("train_").replace("_", " ")


def print_report(res):
    m, r = res["machine"], res
    print(f"\n{m['device_name']} ({m['device']}; {' '.join(m['cpu_flags']) or 'no AVX'}), {m['torch_threads']} torch threads, "
          f"torch {m['torch']}, commit {m['git_commit']}" + (", under CUDA MPS" if r["mps"] else ""))
    bn = f" (batch norm over {r['bn_batch']} images)" if r["bn_batch"] else ""
    print(f"data: {r['data']}, {r['train_images']} training images; {r['model']}{bn}, loss {r['loss']}, batch {r['batch_size']}")
    print(f"defaults: {r['defaults_chosen']['described']}")
    if r["concurrent"]:
        print(f"\n{'runs at once':>12s} {'threads each':>12s} {'aggregate img/s':>16s} {'per run img/s':>24s} {'full runs/h':>12s}")
        for row in r["concurrent"]:
            per_run = " ".join(f"{v:.0f}" for v in row["per_run_img_per_s"])
            print(f"{row['k']:12d} {row['threads_each']:12d} {row['aggregate_img_per_s']:16.1f} {per_run[:24]:>24s} "
                  f"{row['full_runs_per_hour']:12.2f}")
        print(f"({r['windows'] * r['window_steps']} timed steps per run after {r['warmup_steps']} warm-up steps; "
              f"a full run is {r['epochs']} epochs of {r['train_images']} images)")
        return
    print(f"\n{'':20s} {'precision':>9s} {'compiled':>8s} {'graph':>5s} {'img/s':>9s} {'overall':>9s} {'min':>9s} {'max':>9s}")
    for name, fig in r["figures"].items():
        print(f"{label(name):20s} {fig['precision']:>9s} {'yes' if fig['compiled'] else 'no':>8s} "
              f"{'yes' if fig['cuda_graph'] else 'no':>5s} "
              f"{fig['img_per_s']:9.1f} {fig['overall_img_per_s']:9.1f} "
              f"{min(fig['windows']):9.1f} {max(fig['windows']):9.1f}")
    print(f"(median of {r['windows']} windows x {r['window_steps']} steps after {r['warmup_steps']} warm-up steps)\n")
    for k, v in r["ratios"].items():
        print(f"{k:24s} {v:6.2f}x")
    print(f"(b) reaches {r['gflop_per_s']:.1f} GFLOP/s at {r['gflop_per_image']:.3f} GFLOP per image ({r['gflop_source']})")
    for name, e in r["estimates"].items():
        print(f"{label(name):20s} {e['seconds_per_epoch']:7.1f} s/epoch, {r['epochs']} epochs: {e['run_hours']:.2f} h "
              f"(training only)")


def main(argv):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but CUDA is not available")
    model = [("model.name", args.model)] if args.model else []
    cfg = config.build(args.config, [("data.root", config.data_root(args.data_root)), ("data.download", "false"), ("data.rho", str(args.rho)),
                                  *model, ("loss.name", args.loss),
                                  ("train.batch_size", str(args.batch_size)), ("train.precision", args.precision),
                                  ("train.compile", args.compile), ("train.cuda_graph", args.cuda_graph),
                                  ("train.compile_mode", args.compile_mode), ("model.bn_batch", str(args.bn_batch))])
    if args.dataset == "folder":
        return folder_main(args, cfg, device)
    x, y, source = train_set(cfg, args.synthetic)
    n_classes = data.num_classes(cfg.data.dataset)
    ctx = {"cfg": cfg, "device": device, "x": x, "y": y, "n_classes": n_classes}
    print("choosing the defaults' precision and compile setting, as train.py does ...", flush=True)
    runtime = resolve_defaults(ctx, args)
    print(f"defaults: {runtime.describe()}")
    settings = (runtime.precision, runtime.compile, runtime.cuda_graph)

    figures, concurrent = {}, None
    if args.concurrent:
        concurrent = bench_concurrent(ctx, args, runtime, len(y))
    else:
        plan = [] if args.skip_reference else [("reference", ("fp32", False, False), lambda: bench_reference(ctx, args))]
        plan.append(("train", settings, lambda: bench_train(ctx, args, *settings)))
        for prec, compiled in grid(ctx, args):
            graph = resolve_cuda_graph(args.cuda_graph, device, 1, compiled)
            plan.append((f"train_{prec}_{'compiled' if compiled else 'eager'}", (prec, compiled, graph),
                         lambda p=prec, c=compiled, g=graph: bench_train(ctx, args, p, c, g)))
        plan.append(("ceiling", settings, lambda: bench_ceiling(ctx, args, *settings)))
        for name, (prec, compiled, graphed), measure_it in plan:
            print(f"measuring {label(name)} ({prec}{', compiled' if compiled else ''}{', CUDA graph' if graphed else ''}) ...",
                  flush=True)
            figures[name] = {"precision": prec, "compiled": compiled, "cuda_graph": graphed, **measure_it()}

    gflop = gflop_per_image(cfg, n_classes)
    per_epoch = len(y) // args.batch_size * args.batch_size if cfg.data.drop_last else len(y)  # images an epoch trains
    ratios, gflops, estimates = derive(figures, gflop, per_epoch, cfg.train.epochs) if figures else ({}, None, {})
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(device), "config": args.config,
        "mps": mps_active(device),
        "data": source, "synthetic": source.startswith("synthetic"), "dataset": cfg.data.dataset, "rho": cfg.data.rho,
        "train_images": len(y), "model": cfg.model.name, "bn_batch": cfg.model.bn_batch, "loss": cfg.loss.name,
        "precision": runtime.precision, "compile": runtime.compile,
        "compile_mode": args.compile_mode if runtime.compile else None, "cuda_graph": runtime.cuda_graph,
        "defaults_chosen": {**runtime.to_dict(), "described": runtime.describe()},
        "batch_size": args.batch_size, "windows": args.windows, "window_steps": args.window_steps,
        "warmup_steps": args.warmup_steps, "figures": figures, "ratios": ratios, "concurrent": concurrent,
        "gflop_per_image": gflop, "gflop_source": "counted: FlopCounterMode, forward + backward",
        "design_gflop_per_image": PUBLISHED_GFLOP_RESNET32 if cfg.model.name == "resnet32" else None,
        "gflop_per_s": gflops, "epochs": cfg.train.epochs, "estimates": estimates,
    }
    print_report(result)
    out = Path(args.json or f"results/bench_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
