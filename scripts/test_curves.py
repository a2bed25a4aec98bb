"""Test top-1 against epoch on CIFAR-10-LT, rho = 100: CE and the LA loss, seed 0, one line per schedule with a
committed run (the schedules of scripts/table3.py), from each run's metrics.jsonl. It shows how the 200-epoch
recipes and the authors' 1,241-epoch one reach their final numbers, with each schedule's learning-rate decays marked.

    python scripts/test_curves.py                                            # the points, as text
    python scripts/test_curves.py --plot results/test_curves_cifar10_rho100.png
"""
import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import table3  # noqa: E402

METHODS = {"ce": "plain CE", "la": "LA loss, tau = 1"}


def curves(seed=0):
    """{method: {schedule: ([epochs], [test top-1], [milestones])}} over the committed, finished runs of that seed
    (as scripts/table3.py counts them)."""
    out = {}
    for method in METHODS:
        for schedule, (folder, _) in table3.SCHEDULES.items():
            if not isinstance(table3.report(schedule, method, seed), dict):
                continue
            run = table3.RESULTS / folder / f"cifar10-lt_rho100_{method}_s{seed}"
            points = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            points = [(p["epoch"], p["test_top1"]) for p in points if "test_top1" in p]
            milestones = yaml.safe_load((run / "config.yaml").read_text())["optim"]["milestones"]
            out.setdefault(method, {})[schedule] = ([e for e, _ in points], [a for _, a in points], milestones)
    return out


def text(table):
    lines = []
    for method, schedules in table.items():
        for schedule, (epochs, top1, milestones) in schedules.items():
            lines.append(f"{METHODS[method]}, {table3.SCHEDULES[schedule][1]}:")
            lines.append("  " + ", ".join(f"{e}: {a:.2f}" for e, a in zip(epochs, top1)))
    return "\n".join(lines)


def plot(table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(5.5 * len(table), 4), sharey=True, squeeze=False)
    for ax, (method, schedules) in zip(axes[0], table.items()):
        for i, (schedule, (epochs, top1, milestones)) in enumerate(schedules.items()):
            color = f"C{i}"
            ax.plot(epochs, top1, marker="o", markersize=3, color=color, label=table3.SCHEDULES[schedule][1])
            for m in milestones:
                ax.axvline(m, color=color, linestyle=":", linewidth=1)
        ax.set(xscale="log", xlabel="epoch (log scale; dotted: learning-rate decays)", title=METHODS[method])
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("test top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})  # no version stamp: the same points give the same file
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plot", metavar="PNG", help="draw the curves into this file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    table = curves(args.seed)
    if not table:
        sys.exit(f"no committed run of seed {args.seed} under {table3.RESULTS}")
    print(text(table))
    if args.plot:
        plot(table, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
