"""bench.py's compiled figures in one process, in the order given (from the repository root, CIFAR-10 in ../shared/data):

    python results/compile_shapes/probe_bench.py c b c        # (c) and (b) as bench.py measures them
    python results/compile_shapes/probe_bench.py made-ahead   # (c)'s step on batches made ahead, fixed or rotating
"""
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts")); sys.path.insert(0, str(REPO))
import bench  # noqa: E402
from la import config, losses  # noqa: E402

args = bench.parse_args(["--device", "cpu", "--data-root", "../shared/data"])
dev = torch.device("cpu")
cfg = config.build(overrides=[("data.root", args.data_root), ("data.download", "false")])
x, y, _ = bench.train_set(cfg, False)
ctx = {"cfg": cfg, "device": dev, "x": x, "y": y, "n_classes": 10, "prec": "bf16", "compile": True, "compile_mode": "default",
       "graph": False, "criterion": losses.build_loss("la", np.bincount(y, minlength=10).tolist(), 1.0, dev)}
for name in sys.argv[1:]:
    if name == "made-ahead":  # no pipeline and no bookkeeping in the timed loop
        model, opt = bench.build_model(cfg, 10, dev, True, True)
        step = bench.make_step(model, ctx["criterion"], opt, "bf16", dev, False)
        pre = list(itertools.islice(bench.endless(bench.tensor_loader(ctx, args)), 40))
        for label, batches in (("fixed", itertools.repeat(pre[0])), ("rotating", itertools.cycle(pre[:32])),
                               ("fixed again", itertools.repeat(pre[0]))):
            print(label, round(bench.measure(step, batches, args, dev)["img_per_s"], 1), flush=True)
    else:
        f = bench.bench_ceiling if name == "c" else bench.bench_train
        print(name, round(f(ctx, args)["img_per_s"], 1), flush=True)
