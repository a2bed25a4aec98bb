"""Compare rules for choosing the post-hoc tau on validation: pick a rule on one half of the runs, report it on the other.

    python scripts/tau_rules.py --choose RUN RUN --report RUN RUN [--draws 1000] [--sizes 20 50 100] [--out OUT]

Reads each run's logits.pt (eval.py writes it). Two measurements of every rule in la.tausweep.RULES:

- own validation: the tau the rule picks on the run's validation split, and the test balanced accuracy there;
- resampled: validation splits of m images per class drawn from the test set, the rule applied to each draw
  and scored on the test images not drawn; mean and standard deviation over draws. Test images stand in for
  unseen training images (both are CIFAR images the model never trained on), so m can exceed the run's own
  split without retraining; the drawn images are never scored.

The rule chosen has the best mean resampled test balanced accuracy at m = the runs' own validation size,
averaged over the --choose runs; the --report runs are only looked at afterwards. Runs whose checkpoint is
before its last epoch are left out unless --include-unfinished (and marked then). Writes OUT.md and OUT.json.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from la import UserError, checkpoint, losses, provenance, run_cli, tausweep  # noqa: E402

TAUS = tausweep.parse_grid("0:3:0.05")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--choose", nargs="+", type=Path, required=True, help="runs the rule is chosen on")
    p.add_argument("--report", nargs="+", type=Path, required=True, help="runs the chosen rule is reported on")
    p.add_argument("--draws", type=int, default=1000, help="resampled validation splits per run and size")
    p.add_argument("--sizes", type=int, nargs="+", default=[20, 50, 100], help="images per class in a resampled split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/tau_rules"), help="writes OUT.md and OUT.json")
    p.add_argument("--include-unfinished", action="store_true", help="keep runs stopped before their last epoch")
    return p.parse_args(argv)


class Run:
    """One run's cached logits, the default shift (tau = 1 after CE, no extra t after the LA loss) and test curves."""

    def __init__(self, run_dir):
        path = Path(run_dir) / "logits.pt"
        if not path.is_file():
            raise UserError(f"{run_dir} holds no logits.pt: evaluate it first (python eval.py {run_dir})")
        cache = checkpoint.load_plain(path, "logits cache")
        self.name, self.cfg = str(run_dir), cache["config"]
        self.progress = cache.get("checkpoint_state")  # caches from before it was kept: ask the checkpoint
        if self.progress is None and (Path(run_dir) / "checkpoint.pt").is_file():
            self.progress = checkpoint.progress(checkpoint.load(Path(run_dir) / "checkpoint.pt"))
        self.loss_tau = float(self.cfg["loss"]["tau"]) if self.cfg["loss"]["name"] == "la" else 0.0
        self.default = 0.0 if self.loss_tau else 1.0
        self.taus = sorted(set(TAUS) | {self.default})
        self.log_pi = losses.log_prior(cache["class_counts"])
        self.C = len(self.log_pi)
        self.val, self.test = cache["splits"]["val"], cache["splits"]["test"]
        self.hit, self.nll = tausweep.per_tau(*self.test, self.log_pi, self.taus)
        self.class_hits = tausweep.class_means(self.hit.double(), self.test[1], self.C) * self.class_sizes()

    def class_sizes(self):
        return torch.bincount(self.test[1], minlength=self.C).double()

    def test_acc(self, tau):
        return 100 * float(tausweep.balanced(self.hit[[self.taus.index(tau)]].double(), self.test[1], self.C)[0])


def own_validation(run):
    """{rule: (tau, test balanced accuracy)} on the run's own validation split, with the default and the oracle."""
    v_hit, v_nll = tausweep.per_tau(*run.val, run.log_pi, run.taus)
    out = {"default": (run.default, run.test_acc(run.default))}
    for rule in tausweep.RULES:
        tau = tausweep.choose(rule, run.taus, v_hit, v_nll, run.val[1], run.C, run.default)
        out[rule] = (tau, run.test_acc(tau))
    oracle = tausweep._best(run.taus, [run.test_acc(t) for t in run.taus], run.default)
    out["oracle"] = (oracle, run.test_acc(oracle))
    return out


def resampled(run, m, draws, rng):
    """{rule: [test balanced accuracy on the undrawn test images, one per draw]} and the default's."""
    labels = run.test[1]
    by_class = [np.flatnonzero(labels.numpy() == c) for c in range(run.C)]
    sizes = run.class_sizes()
    scores = {rule: [] for rule in ["default", *tausweep.RULES]}
    for _ in range(draws):
        idx = torch.as_tensor(np.concatenate([rng.choice(members, m, replace=False) for members in by_class]))
        hit, nll, y = run.hit[:, idx], run.nll[:, idx], labels[idx]
        drawn = tausweep.class_means(hit.double(), y, run.C) * m
        rest = 100 * ((run.class_hits - drawn) / (sizes - m)).mean(1)  # T: balanced accuracy on the undrawn images
        scores["default"].append(float(rest[run.taus.index(run.default)]))
        for rule in tausweep.RULES:
            tau = tausweep.choose(rule, run.taus, hit, nll, y, run.C, run.default)
            scores[rule].append(float(rest[run.taus.index(tau)]))
    return scores


def finished(run):
    return bool(run.progress and run.progress["finished"])


def label(run):
    """The run's name, marked when it has not finished (or nothing says whether it has)."""
    if finished(run):
        return run.name
    if run.progress is None:
        return run.name + " (progress unknown)"
    return run.name + f" (UNFINISHED: {checkpoint.describe_progress(run.progress)})"


def measure(runs, args):
    """{run name: {"own": ..., "val_per_class": ..., "resampled": {m: {rule: (mean, sd, worst) over draws}}}}."""
    rng, out = np.random.RandomState(args.seed), {}
    for run in runs:
        res = {"loss": run.cfg["loss"]["name"], "val_per_class": run.cfg["data"]["val_per_class"],
               "label": label(run), "progress": run.progress, "own": own_validation(run), "resampled": {}}
        for m in args.sizes:
            scores = resampled(run, m, args.draws, rng)
            res["resampled"][m] = {r: (float(np.mean(v)), float(np.std(v, ddof=1)), float(np.min(v)))
                                   for r, v in scores.items()}
        out[run.name] = res
        print(f"measured {run.name}", file=sys.stderr)
    return out


def pick(results, names, size):
    """The rule with the best mean resampled accuracy at the given size over the named runs."""
    mean = lambda rule: np.mean([results[n]["resampled"][size][rule][0] for n in names])
    return max(tausweep.RULES, key=mean), {rule: float(mean(rule)) for rule in tausweep.RULES}


def markdown(results, halves, chosen, args, left_out):
    rules = ["default", *tausweep.RULES, "oracle"]
    head = {"default": "default (tau 1 / t 0)", "oracle": "oracle (test-tuned)"}
    lines = ["Own validation split: tau (extra t for LA runs) chosen, test balanced accuracy (%) there.", "",
             "| half | run | " + " | ".join(head.get(r, r) for r in rules) + " |", "|---" * (len(rules) + 2) + "|"]
    for half, names in halves.items():
        for n in names:
            own = results[n]["own"]
            cells = " | ".join(f"{own[r][0]:g}: {own[r][1]:.2f}" for r in rules)
            lines.append(f"| {half} | {results[n]['label']} | {cells} |")
    lines += ["", f"Resampled validation splits ({args.draws} draws of m images per class from the test set, scored on "
              f"the undrawn test images): test balanced accuracy (%), mean over draws (sd over draws; worst draw), "
              f"each averaged over the half's runs.",
              "", "| half | rule | " + " | ".join(f"m = {m}" for m in args.sizes) + " |", "|---" * (len(args.sizes) + 2) + "|"]
    for half, names in halves.items():
        for rule in rules[:-1]:
            cells = []
            for m in args.sizes:
                mean, sd, worst = np.mean([results[n]["resampled"][m][rule] for n in names], axis=0)
                cells.append(f"{mean:.2f} ({sd:.2f}; {worst:.2f})")
            lines.append(f"| {half} | {head.get(rule, rule)} | " + " | ".join(cells) + " |")
    lines += ["", f"Chosen on the choose half: **{chosen}** ({tausweep.RULES[chosen]}). "
              f"Made at commit {provenance.short_commit(provenance.git_state())}."]
    if left_out:
        lines.append(f"Left out, not finished (--include-unfinished keeps them): {'; '.join(left_out)}.")
    return "\n".join(lines) + "\n"


def main(argv):
    args = parse_args(argv)
    runs = {half: [Run(p) for p in paths] for half, paths in (("choose", args.choose), ("report", args.report))}
    left_out = [label(r) for half in runs.values() for r in half if not finished(r) and not args.include_unfinished]
    runs = {half: [r for r in rs if finished(r) or args.include_unfinished] for half, rs in runs.items()}
    if not runs["choose"] or not runs["report"]:
        raise SystemExit(f"error: a half has no finished run (left out: {'; '.join(left_out)})")
    halves = {half: [r.name for r in rs] for half, rs in runs.items()}
    results = measure(runs["choose"] + runs["report"], args)
    own_sizes = {results[n]["val_per_class"] for n in halves["choose"]}
    if len(own_sizes) != 1 or own_sizes.pop() not in args.sizes:
        raise SystemExit("error: the --choose runs need one validation size, and --sizes must include it")
    chosen, scores = pick(results, halves["choose"], results[halves["choose"][0]]["val_per_class"])
    text = markdown(results, halves, chosen, args, left_out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(text)
    Path(f"{args.out}.json").write_text(json.dumps({"halves": halves, "chosen": chosen, "choose_scores": scores,
                                                    "draws": args.draws, "left_out": left_out, "runs": results},
                                                   indent=1) + "\n")
    print(text + f"\nwritten: {args.out}.md, {args.out}.json")
    return 0


if __name__ == "__main__":
    run_cli(main)
