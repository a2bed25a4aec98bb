"""The paper's Table 3 column (CIFAR-10-LT, rho = 100, ResNet-32) over seeds, from the committed runs' eval.json.

    python scripts/table3.py           # the tables, as markdown
    python scripts/table3.py --write   # put them into RESULTS.md and README.md, between their table3 markers
    python scripts/table3.py --check   # exit 1 unless RESULTS.md and README.md hold exactly these tables

Per row: the mean ± sample std over seeds with n, each seed's value, the paper's number (Menon et al., Table 3) and,
where one exists, the authors' released code's (its README), and the schedule the runs trained under; a row for each
schedule with a run of it. Then the paired differences that matter, seed by seed within one schedule. Runs are
results/{paper,cao,official}_cifar10/cifar10-lt_rho100_{method}_s{seed}/; a seed not committed yet is left out of n, a run
that did not finish is left out.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
SEEDS = (0, 1, 2)
MISSING = "—"
SCHEDULES = {"paper": ("paper_cifar10", "paper: x0.1 at 160, 180"),
             "cao": ("cao_cifar10", "Cao et al.: x0.01 at 160, x0.0001 at 180"),
             "official": ("official_cifar10", "authors' code: 1,241 epochs, x0.1 at 604, 926, 1128")}
# The tau rule val-nll was chosen with the test labels of these runs (scripts/tau_rules.py: CE s0 and LA s0 the
# choose half, CE s1 in the report half); a run trained since is its clean test.
RULE_RUNS = {("paper", "ce", 0): "rule chosen on it", ("paper", "la", 0): "rule chosen on it",
             ("paper", "ce", 1): "rule checked on it"}


def raw(r):
    return r["test"]["raw"]["top1"], None


def posthoc(r):
    return r["test"]["posthoc"]["top1"], None


def tau_on_validation(r):
    chosen = r["tau_sweep"]["validation_chosen"]
    return chosen["test_top1"], ("t" if r["loss"] == "la" else "tau", chosen["tau"])  # t: on top of the LA loss's 1


def wnorm(r):
    return r["test"]["wnorm"]["top1"], None


def wnorm_on_validation(r):
    return r["wnorm_sweep"]["validation_chosen"]["test_top1"], ("T", r["wnorm_sweep"]["validation_chosen"]["tau"])


# (row label, run method, value, paper, authors' code); each row is given per schedule that has a run of it
ROWS = (
    ("ERM: plain CE", "ce", raw, 72.84, 71.36),
    ("weight normalisation, T = 1", "ce", wnorm, 75.98, None),
    ("weight normalisation, T on validation", "ce", wnorm_on_validation, None, None),
    ("LDAM", "ldam", raw, 73.35, None),
    ("LDAM-DRW", "ldam-drw", raw, 77.03, None),
    ("CE + post-hoc, tau = 1", "ce", posthoc, 77.40, 77.32),
    ("CE + post-hoc, tau on validation", "ce", tau_on_validation, None, None),
    ("LA loss, tau = 1", "la", raw, 77.67, 77.89),
    ("LA loss + post-hoc, t on validation", "la", tau_on_validation, None, None),
)


def report(schedule, method, seed):
    """eval.json of a committed run, or None where it is not committed; 'unfinished' where it stopped early."""
    path = RESULTS / SCHEDULES[schedule][0] / f"cifar10-lt_rho100_{method}_s{seed}" / "eval.json"
    if not path.exists():
        return None
    rep = json.loads(path.read_text())
    return rep if rep.get("finished", True) else "unfinished"


def values(schedule, method, value):
    """{seed: (top1, (letter, temperature) or None)} over the committed, finished runs whose eval.json has it."""
    out = {}
    for seed in SEEDS:
        rep = report(schedule, method, seed)
        if isinstance(rep, dict):
            try:
                out[seed] = value(rep)
            except KeyError:  # e.g. weight normalisation of a run kept without its checkpoint
                pass
    return out


def mean_sd(xs):
    if len(xs) == 1:
        return f"{xs[0]:.2f} (n = 1)"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f} (n = {len(xs)})"


def cell(top1, temperature):
    return f"{top1:.2f}" + (f" ({temperature[0]} {temperature[1]:g})" if temperature else "")


def published(v):
    return MISSING if v is None else f"{v:.2f}"



def main_rows():
    """(label, schedule, {seed: value}, paper, authors) of every row with at least one run."""
    rows = []
    for label, method, value, paper, authors in ROWS:
        for schedule in SCHEDULES:
            got = values(schedule, method, value)
            if got:
                rows.append((label, schedule, got, paper, authors))
    return rows


def results_table():
    lines = ["| method | schedule | ours: mean ± sd (n) | seed 0 | seed 1 | seed 2 | paper | authors' code |",
             "|---|---|---|---|---|---|---|---|"]
    for label, schedule, got, paper, authors in main_rows():
        seeds = [cell(*got[s]) if s in got else MISSING for s in SEEDS]
        lines.append(f"| {label} | {SCHEDULES[schedule][1]} | **{mean_sd([v[0] for v in got.values()])}** | "
                     + " | ".join(seeds) + f" | {published(paper)} | {published(authors)} |")
    return "\n".join(lines)


# How each README row is trained and evaluated: train.py's loss flags per method, eval.py's flags per row.
TRAIN_FLAGS = {"ce": "--loss ce", "la": "--loss la", "ldam": "--loss ldam", "ldam-drw": "--loss ldam --drw"}
EVAL_FLAGS = {"ERM: plain CE": "", "weight normalisation, T = 1": "--wnorm-tau 1",
              "weight normalisation, T on validation": "--tau-sweep", "LDAM": "", "LDAM-DRW": "",
              "CE + post-hoc, tau = 1": "--posthoc --tau 1", "CE + post-hoc, tau on validation": "--tau-sweep",
              "LA loss, tau = 1": "", "LA loss + post-hoc, t on validation": "--tau-sweep"}


def readme_table():
    """The paper schedule's rows only, each with links to its runs' folders and its two commands."""
    lines = ["| method | ours: mean ± sd (n seeds) | paper | authors' code | runs (logs) | train.py / eval.py RUN |",
             "|---|---|---|---|---|---|"]
    methods = {label: method for label, method, *_ in ROWS}
    for label, schedule, got, paper, authors in main_rows():
        if schedule != "paper":
            continue
        folder = f"results/{SCHEDULES[schedule][0]}/cifar10-lt_rho100_{methods[label]}"
        runs = " ".join(f"[s{s}]({folder}_s{s}/)" for s in sorted(got))
        command = f"`{TRAIN_FLAGS[methods[label]]}` / " + (f"`{EVAL_FLAGS[label]}`" if EVAL_FLAGS[label] else "(raw)")
        lines.append(f"| {label} | {mean_sd([v[0] for v in got.values()])} | {published(paper)} "
                     f"| {published(authors)} | {runs} | {command} |")
    return "\n".join(lines)


# (label, (method, value) of the minuend, the same of the subtrahend); each is taken within one schedule
DIFFERENCES = (
    ("LA loss minus CE + post-hoc tau = 1", ("la", raw), ("ce", posthoc)),
    ("CE + post-hoc: tau on validation minus tau = 1", ("ce", tau_on_validation), ("ce", posthoc)),
    ("LDAM-DRW minus LA loss", ("ldam-drw", raw), ("la", raw)),
)


def differences_table():
    lines = ["| paired difference (points) | schedule | seed 0 | seed 1 | seed 2 | mean ± sd (n) |",
             "|---|---|---|---|---|---|"]
    for label, a, b in DIFFERENCES:
        for schedule in SCHEDULES:
            va, vb = values(schedule, *a), values(schedule, *b)
            paired = {s: va[s][0] - vb[s][0] for s in SEEDS if s in va and s in vb}
            if not paired:
                continue
            seeds = []
            for s in SEEDS:
                note = RULE_RUNS.get((schedule, a[0], s)) if a[1] is tau_on_validation else None
                seeds.append(MISSING if s not in paired else f"{paired[s]:+.2f}" + (f" ({note})" if note else ""))
            lines.append(f"| {label} | {schedule} | " + " | ".join(seeds)
                         + f" | {mean_sd(list(paired.values()))} |")
    return "\n".join(lines)


def documents():
    """{document: {marker name: the table it holds between `<!-- table3 NAME -->` and `<!-- /table3 -->`}}."""
    return {"RESULTS.md": {"results": results_table(), "differences": differences_table()},
            "README.md": {"readme": readme_table()}}


def block(text, name):
    """(start, end) of the text between the marker lines of table `name`."""
    begin = f"<!-- table3 {name} -->\n"
    start = text.find(begin) + len(begin)
    end = text.find("<!-- /table3 -->", start)
    if start < len(begin) or end < 0:
        sys.exit(f"no '<!-- table3 {name} -->' ... '<!-- /table3 -->' lines to put table {name} between")
    return start, end


def generate(argv, documents, description, script):
    """Print the tables of `documents()` ({document: {marker name: table}}), or with --write put each between its
    markers, or with --check exit 1 unless every document holds them as generated now. Shared with
    scripts/provenance_table.py."""
    p = argparse.ArgumentParser(description=description)
    mode = p.add_mutually_exclusive_group()
    names = " and ".join(documents())
    mode.add_argument("--write", action="store_true", help=f"put the tables into {names}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 unless {names} hold these tables")
    args = p.parse_args(argv)
    if not (args.write or args.check):
        print(*(t for tables in documents().values() for t in tables.values()), sep="\n\n")
        return 0
    stale = []
    for doc, tables in documents().items():
        text = (REPO / doc).read_text()
        for name, table in tables.items():
            start, end = block(text, name)
            if text[start:end] != table + "\n":
                stale.append(f"{doc} ({name})")
                text = text[:start] + table + "\n" + text[end:]
        if args.write:
            (REPO / doc).write_text(text)
    if args.check and stale:
        print(f"stale tables in {', '.join(stale)}: run python scripts/{script} --write", file=sys.stderr)
        return 1
    return 0


def main(argv):
    return generate(argv, documents, __doc__.split("\n")[0], "table3.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
