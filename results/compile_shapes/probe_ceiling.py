"""bench.py's compiled (c) on batches made ahead, fixed or rotating: no pipeline, no bookkeeping in the timed loop.

    python results/compile_shapes/probe_ceiling.py      # from the repository root, CIFAR-10 in ../shared/data
"""
import itertools, sys
from pathlib import Path
import numpy as np, torch
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts")); sys.path.insert(0, str(REPO))
import bench
from la import config, data, losses, precision
args = bench.parse_args(["--device", "cpu", "--data-root", "../shared/data"])
dev = torch.device("cpu")
cfg = config.build(overrides=[("data.root", args.data_root), ("data.download", "false")])
x, y, _ = bench.train_set(cfg, False)
ctx = {"cfg": cfg, "device": dev, "x": x, "y": y, "n_classes": 10, "prec": "bf16", "compile": True, "compile_mode": "default",
       "graph": False, "criterion": losses.build_loss("la", np.bincount(y, minlength=10).tolist(), 1.0, dev)}
model, opt = bench.build_model(cfg, 10, dev, True, True)
step = bench.make_step(model, ctx["criterion"], opt, "bf16", dev, False)
loader = bench.tensor_loader(ctx, args)
pre = list(itertools.islice(bench.endless(loader), 40))  # 40 batches made ahead: no pipeline in the timed loop
fixed = pre[0]
for name, batches in (("fixed", itertools.repeat(fixed)), ("rotating", itertools.cycle(pre[:32])), ("fixed again", itertools.repeat(fixed))):
    print(name, round(bench.measure(step, batches, args, dev)["img_per_s"], 1), flush=True)
