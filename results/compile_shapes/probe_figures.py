"""bench.py's compiled figures (b) and (c), in the order given, in one process: python results/compile_shapes/probe_figures.py c b c"""
import sys
from pathlib import Path
import numpy as np, torch
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts")); sys.path.insert(0, str(REPO))
import bench
from la import config, losses
args = bench.parse_args(["--device", "cpu", "--data-root", "../shared/data"])
dev = torch.device("cpu")
cfg = config.build(overrides=[("data.root", args.data_root), ("data.download", "false")])
x, y, _ = bench.train_set(cfg, False)
ctx = {"cfg": cfg, "device": dev, "x": x, "y": y, "n_classes": 10, "prec": "bf16", "compile": True, "compile_mode": "default",
       "graph": False, "criterion": losses.build_loss("la", np.bincount(y, minlength=10).tolist(), 1.0, dev)}
for name in sys.argv[1:]:
    f = bench.bench_ceiling if name == "c" else bench.bench_train
    print(name, round(f(ctx, args)["img_per_s"], 1), flush=True)
