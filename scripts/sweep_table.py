"""Tabulate a rho sweep: our top-1 (mean ± std over seeds) beside the published numbers, as markdown, CSV and a plot.

    python scripts/sweep_table.py --dataset cifar10 --runs runs/sweep_cifar10 --rhos "200 100 50 10" --seeds "0 1 2"

Reads RUNS/rho{rho}_{method}_s{seed}/eval.json as written by `eval.py CE_RUN --posthoc --tau 1` (with
--wnorm-tau 1 for the weight-normalisation row) and `eval.py RUN` for the other methods; writes
OUT/{dataset}_rho_sweep.{md,csv,png}. --methods picks the rows: ce (baseline and post-hoc), la, wnorm (of the ce
runs), ldam, ldam-drw, ce-drw.
Runs that have not finished (eval.json's `finished`) are marked and left out of the means unless
--include-unfinished.
"""
import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # la.plots, whichever directory this is run from
from la import plots, provenance, rundir  # noqa: E402

# (row, the --methods word that asks for it, the run's method, the eval.json section holding its result)
ROWS = (("Baseline", "ce", "ce", "raw"), ("Post-hoc adjustment", "ce", "ce", "posthoc"),
        ("Weight normalisation (T = 1)", "wnorm", "ce", "wnorm"), ("Loss adjustment", "la", "la", "raw"),
        ("LDAM", "ldam", "ldam", "raw"), ("LDAM-DRW", "ldam-drw", "ldam-drw", "raw"),
        ("CE-DRW", "ce-drw", "ce-drw", "raw"))
METHOD_WORDS = sorted({word for _, word, _, _ in ROWS})

# Seed table (ResNet-34 CIFAR variant, mmpretrain recipe, 200 epochs), top-1 % at rho = 200, 100, 50, 10.
SEED_RHOS = (200.0, 100.0, 50.0, 10.0)
SEED_TABLE = {
    "cifar10": {"Baseline": (73.08, 77.54, 81.84, 89.39), "Post-hoc adjustment": (76.59, 80.67, 83.98, 90.01),
                "Loss adjustment": (76.19, 80.26, 83.41, 90.93)},
    "cifar100": {"Baseline": (41.22, 45.98, 51.87, 64.75), "Post-hoc adjustment": (44.64, 49.92, 54.91, 65.99),
                 "Loss adjustment": (44.14, 48.53, 54.35, 65.75)},
}
# Menon et al. (2020) Table 3 (ResNet-32, 200 epochs, mean of 5 runs; 100 minus balanced error): rho = 100 only.
# LDAM is Table 3's "Adaptive" row (Cao et al.'s LDAM + SGD); LDAM-DRW is quoted in its section 6.2.
PAPER_RHO = 100.0
PAPER_TABLE = {
    "cifar10": {"Baseline": 72.84, "Post-hoc adjustment": 77.40, "Weight normalisation (T = 1)": 75.98,
                "Loss adjustment": 77.67, "LDAM": 73.35, "LDAM-DRW": 77.03},
    "cifar100": {"Baseline": 38.36, "Post-hoc adjustment": 41.76, "Weight normalisation (T = 1)": 41.11,
                 "Loss adjustment": 43.89, "LDAM": 39.60, "LDAM-DRW": 42.04},
}
MISSING = "—"
NAMES = {"cifar10": "CIFAR-10-LT", "cifar100": "CIFAR-100-LT"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=sorted(SEED_TABLE), required=True)
    p.add_argument("--runs", type=Path, required=True, help="the sweep's run directory (sweep_rho.sh's OUT)")
    p.add_argument("--rhos", required=True, help='space-separated, in column order, spelled as in the run names: "200 100 50 10"')
    p.add_argument("--seeds", default="0", help='space-separated: "0 1 2"')
    p.add_argument("--methods", default="ce la", help=f'space-separated rows to tabulate, of {" ".join(METHOD_WORDS)}')
    p.add_argument("--config", default="train.py's default recipe", help="the recipe the runs used, for the header")
    p.add_argument("--out", type=Path, default=Path("results"), help="directory for the .md, .csv and .png")
    p.add_argument("--include-unfinished", action="store_true",
                   help="count runs that stopped before their last epoch in the means (marked either way)")
    args = p.parse_args(argv)
    args.rhos, args.seeds = args.rhos.split(), args.seeds.split()
    unknown = sorted(set(args.methods.split()) - set(METHOD_WORDS))
    if unknown:
        p.error(f"--methods: unknown {' '.join(unknown)}; choose from {' '.join(METHOD_WORDS)}")
    args.rows = [row for row in ROWS if row[1] in args.methods.split()]
    args.run_methods = sorted({method for _, _, method, _ in args.rows})
    for rho in args.rhos:
        float(rho)  # a typo fails here, not as an empty column
    return args


def published(dataset, method, rho):
    """(seed table, paper) top-1 for this cell; None where that source has no number."""
    rho = float(rho)
    seed = SEED_TABLE[dataset][method][SEED_RHOS.index(rho)] if rho in SEED_RHOS and method in SEED_TABLE[dataset] else None
    paper = PAPER_TABLE[dataset].get(method) if rho == PAPER_RHO else None
    return seed, paper


def finished(run_dir, report):
    """eval.json's `finished`; for an eval.json from before it was recorded, whether metrics.jsonl reached
    config.yaml's epochs; None when neither tells."""
    return bool(report["finished"]) if "finished" in report else rundir.finished(run_dir)


def read_top1(run_dir, method, section):
    """One run's (test top-1, finished) for one method, or None if the run is missing, unevaluated or evaluated
    otherwise. finished is None when unknown, and then counts as unfinished."""
    path = run_dir / "eval.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    result = report.get("test", {}).get(section)
    if report.get("method", report.get("loss")) != method or result is None:  # "method" since DRW; ce/la before
        return None
    if section in ("posthoc", "wnorm") and result.get("tau") != 1.0:  # the published numbers are tau = 1
        print(f"warning: {path} has {section} tau={result.get('tau')}, not 1: left out", file=sys.stderr)
        return None
    return float(result["top1"]), finished(run_dir, report)


def collect(runs, rows, rhos, seeds):
    """{row: {rho: [(top-1, finished) of each seed evaluated]}}."""
    cells = {}
    for row, _, method, section in rows:
        cells[row] = {}
        for rho in rhos:
            found = (read_top1(runs / f"rho{rho}_{method}_s{seed}", method, section) for seed in seeds)
            cells[row][rho] = [v for v in found if v is not None]
    return cells


def counted(cell, include_unfinished):
    """(the values that enter the mean, how many unfinished runs the cell holds)."""
    unfinished = sum(1 for _, done in cell if not done)
    return [v for v, done in cell if done or include_unfinished], unfinished


def summarize(values):
    """(mean, sample std or None, n); mean is None when no seed finished."""
    if not values:
        return None, None, 0
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return float(np.mean(values)), std, len(values)


def cell_text(cell, n_asked, seed_pub, paper_pub, include_unfinished=False):
    values, unfinished = counted(cell, include_unfinished)
    mean, std, n = summarize(values)
    ours = MISSING if mean is None else f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")
    notes = [f"n={n}" + (f"/{n_asked}" if n < n_asked else "")] if n else []
    if unfinished:
        notes.append(f"{unfinished} unfinished {'included' if include_unfinished else 'left out'}")
    notes += [f"{label} {v:.2f}" for label, v in (("seed", seed_pub), ("paper", paper_pub)) if v is not None]
    return ours + (f" ({'; '.join(notes)})" if notes else "")


def trained_epochs(runs, methods, rhos, seeds):
    """The epochs the runs actually reached (last line of each metrics.jsonl), as text for the header."""
    epochs = set()
    for rho in rhos:
        for seed in seeds:
            for method in methods:
                records = rundir.read_metrics(runs / f"rho{rho}_{method}_s{seed}")
                if records:
                    epochs.add(records[-1]["epoch"])
    if not epochs:
        return "unknown"
    return str(epochs.pop()) if len(epochs) == 1 else f"{min(epochs)} to {max(epochs)} (the runs differ!)"


def commits(runs, methods, rhos, seeds):
    """The commits the runs were trained at (provenance.json) and evaluated at (eval.json), as text."""
    trained, evaluated = set(), set()
    for rho in rhos:
        for seed in seeds:
            for method in methods:
                run_dir = runs / f"rho{rho}_{method}_s{seed}"
                try:
                    sessions = json.loads((run_dir / "provenance.json").read_text())["sessions"]
                    trained.update(provenance.short_commit(s) for s in sessions)
                except (OSError, ValueError, KeyError, TypeError):
                    pass
                try:
                    evaluated.add(provenance.short_commit(json.loads((run_dir / "eval.json").read_text())["evaluated_with"]))
                except (OSError, ValueError, KeyError, TypeError):
                    pass
    name = lambda found: ", ".join(sorted(found)) or "not recorded"
    return f"trained at {name(trained)}, evaluated at {name(evaluated)}"


def markdown(args, cells, epochs):
    lines = [
        f"# {NAMES[args.dataset]}: test top-1 (%) against the imbalance ratio rho",
        "",
        f"Ours: {args.config}, epochs {epochs}, seeds {' '.join(args.seeds)} "
        f"(mean ± sample std over the n seeds in the mean; n=k/N where only k of N seeds count; runs that stopped "
        f"before their last epoch are {'included' if args.include_unfinished else 'left out'} and counted as "
        f"unfinished), {commits(args.runs, args.run_methods, args.rhos, args.seeds)}, table made at "
        f"{provenance.short_commit(provenance.git_state())}. "
        f"Published numbers in parentheses come from other recipes (seed = ResNet-34, mmpretrain recipe, 200 epochs; "
        f"paper = Menon et al. Table 3, ResNet-32, 200 epochs, rho=100 only), so shortened runs are not expected to match. "
        f"{MISSING} = no finished run.",
        "",
        "| method | " + " | ".join(f"ρ={rho}" for rho in args.rhos) + " |",
        "|---" * (len(args.rhos) + 1) + "|",
    ]
    for method, _, _, _ in args.rows:
        row = [cell_text(cells[method][rho], len(args.seeds), *published(args.dataset, method, rho), args.include_unfinished)
               for rho in args.rhos]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path, args, cells):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "rho", "mean", "std", "n", "unfinished", "seed_published", "paper_published"])
        blank = lambda v: "" if v is None else round(v, 4)  # missing stays empty, never 0
        for method, _, _, _ in args.rows:
            for rho in args.rhos:
                values, unfinished = counted(cells[method][rho], args.include_unfinished)
                mean, std, n = summarize(values)
                w.writerow([method, rho, blank(mean), blank(std), n, unfinished,
                            *map(blank, published(args.dataset, method, rho))])


def plot(path, args, cells, epochs):
    """Missing cells are NaN, a gap in the line; a single seed has no error bar."""
    table, unfinished = {}, 0
    for method, _, _, _ in args.rows:
        table[method] = {}
        for rho in args.rhos:
            values, k = counted(cells[method][rho], args.include_unfinished)
            mean, std, _ = summarize(values)
            unfinished += k
            x = int(float(rho)) if float(rho).is_integer() else float(rho)
            table[method][x] = (math.nan, math.nan) if mean is None else (mean, std or 0.0)
    note = (f"; {unfinished} results of unfinished runs {'included' if args.include_unfinished else 'left out'}"
            if unfinished else "")
    plots.rho_curve(table, path, f"{NAMES[args.dataset]}, epochs {epochs}, seeds {' '.join(args.seeds)}{note}")


def main(argv):
    args = parse_args(argv)
    cells = collect(args.runs, args.rows, args.rhos, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.dataset}_rho_sweep"
    epochs = trained_epochs(args.runs, args.run_methods, args.rhos, args.seeds)
    text = markdown(args, cells, epochs)
    Path(f"{stem}.md").write_text(text)
    write_csv(f"{stem}.csv", args, cells)
    plot(f"{stem}.png", args, cells, epochs)
    print(text + f"\nwritten: {stem}.md, {stem}.csv, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
