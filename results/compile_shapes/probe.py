"""Does the short last batch turn train.py's compiled step dynamic, and slower? Eager vs compile default vs dynamic=False.

    python results/compile_shapes/probe.py eager default static
"""
import sys, time, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from la import engine, losses, models
torch.manual_seed(0)
dev = torch.device("cpu")
crit = losses.build_loss("ce", [1] * 10, 1.0, dev)
x128 = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last); y128 = torch.randint(0, 10, (128,))
x98, y98 = x128[:98], y128[:98]
for name in sys.argv[1:]:
    model = models.build("resnet32", 10).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    m = model if name == "eager" else torch.compile(model, dynamic=False if name == "static" else None)
    t0 = time.perf_counter()
    for x, y in ((x128, y128), (x128, y128), (x98, y98), (x98, y98)):
        engine.train_step(m, crit, opt, x, y, "bf16", dev)
    warm = time.perf_counter() - t0
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(15):
            engine.train_step(m, crit, opt, x128, y128, "bf16", dev)
        rates.append(15 * 128 / (time.perf_counter() - t0))
    print(f"{name:8s} warm-up/compile {warm:6.1f} s  img/s after a 98-image batch: {sorted(rates)[1]:.1f} ({min(rates):.1f}-{max(rates):.1f})", flush=True)
