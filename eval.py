"""Evaluate trained runs: raw and post-hoc logit-adjusted metrics, a tau sweep chosen on validation, plots.

    python eval.py                          # runs/latest
    python eval.py RUN --posthoc --tau 1    # argmax f(x) - tau * log(prior)
    python eval.py RUN --tau-sweep          # tau=1, tau chosen on validation by a named rule, the test-tuned oracle
                                            # (and, for a CE run, the same for weight normalisation)
    python eval.py RUN --wnorm-tau 1        # classifier weights w_y / ||w_y||^T (Kang et al., 2020)
    python eval.py CE_RUN LA_RUN --posthoc --plot per_class.png
    python eval.py --logits FILE.npz        # any model's logits: raw, tau = 1, tau chosen on validation, the oracle
    python eval.py RUN --export-logits FILE.npz   # a run's logits in that format

Logits are computed once per checkpoint and cached in the run directory (logits.pt), with the penultimate
features that weight normalisation needs (features.pt). A --logits file (.npz or .pt) holds test_logits (N x C),
test_labels, train_counts (C) and, optionally, val_logits and val_labels (la/logitsfile.py).
"""
import json
import math
import sys
from pathlib import Path

import torch

from la import (UserError, run_cli, build, checkpoint, config, data, dist, engine, logitsfile, losses, metrics, provenance,
                rundir, runtime, tausweep)

# balanced accuracy first: on a test set that is not balanced (your own data) it is the headline, top-1 beside it
ACCURACY_ROWS = (("balanced_acc", "balanced acc"), ("balanced_acc_ci95", "  95 % interval"),
                 ("top1", "top-1"), ("top1_ci95", "  95 % interval"))
ROWS = ACCURACY_ROWS + (("many", "many-shot (>100)"), ("medium", "medium-shot (20-100)"), ("few", "few-shot (<20)"),
                        ("nll", "NLL"), ("ece", "ECE (15 bins)"))


def parse_args(argv):
    p = config.Parser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*", help="run directories or checkpoint files (default runs/latest)")
    p.add_argument("--logits", metavar="FILE", help="evaluate any model's logits from a .npz or .pt file instead of a "
                   "run: raw, tau = 1, tau chosen on validation and the test-tuned oracle (implies --tau-sweep)")
    p.add_argument("--json", metavar="FILE", help="with --logits: also write the report as JSON (a run's is its eval.json)")
    p.add_argument("--export-logits", metavar="FILE", help="write RUN's logits as a .npz or .pt file that --logits reads")
    p.add_argument("--posthoc", action="store_true", help="also report argmax f(x) - tau * log(prior)")
    p.add_argument("--tau", type=float, help="post-hoc temperature (default 1, the paper's); implies --posthoc")
    p.add_argument("--allow-negative-tau", action="store_true", help="permit --tau < 0 (it favours the head classes)")
    p.add_argument("--tau-sweep", action="store_true",
                   help="sweep tau; choose it on validation by --tau-rule, report the test-tuned oracle apart")
    p.add_argument("--tau-rule", choices=list(tausweep.RULES),
                   help=f"how the sweep chooses tau on validation (default {tausweep.DEFAULT_RULE}); implies --tau-sweep")
    p.add_argument("--taus", metavar="START:STOP:STEP",
                   help="sweep grid, STOP included (default 0:3:0.05); implies --tau-sweep")
    p.add_argument("--wnorm-tau", type=float, metavar="T",
                   help="also report post-hoc weight normalisation: classifier weights w_y / ||w_y||^T, no bias")
    p.add_argument("--plot", metavar="PNG", help="per-class accuracy chart of all runs, head to tail")
    p.add_argument("--data-root", help="where the dataset lives if logits must be computed (default: the run's)")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=1024)
    args = p.parse_args(argv)
    check_sources(args)
    # a flag that only means something with another turns that one on, rather than being silently ignored
    args.posthoc |= args.logits is not None
    args.tau_sweep |= args.logits is not None
    args.posthoc |= args.tau is not None
    args.tau = 1.0 if args.tau is None else args.tau
    args.tau_sweep |= args.tau_rule is not None or args.taus is not None
    args.tau_rule = args.tau_rule or tausweep.DEFAULT_RULE
    args.taus = tausweep.parse_grid(args.taus or "0:3:0.05")  # now, not after the logits are computed
    if not math.isfinite(args.tau):
        raise UserError(f"--tau must be a finite number, got {args.tau}")
    if args.wnorm_tau is not None and not (math.isfinite(args.wnorm_tau) and args.wnorm_tau >= 0):
        raise UserError(f"--wnorm-tau must be a finite number >= 0, got {args.wnorm_tau}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.tau < 0 and not args.allow_negative_tau:
        raise UserError(f"--tau {args.tau:g} is negative, which pushes predictions toward the head; pass --allow-negative-tau if you mean it")
    return args


def check_sources(args):
    """Runs, or one --logits file, or one run to --export-logits; the options that need one of them."""
    if args.logits is not None and (args.runs or args.export_logits or args.wnorm_tau is not None):
        what = "RUN" if args.runs else "--export-logits" if args.export_logits else "--wnorm-tau (a run's features)"
        raise UserError(f"--logits {args.logits} is evaluated on its own; drop {what}")
    if args.json is not None and args.logits is None:
        raise UserError("--json is for --logits; a run's report is its eval.json")
    if args.export_logits is not None:
        if len(args.runs) > 1 or args.plot:
            raise UserError("--export-logits writes one run's logits: name one RUN, without --plot")
        logitsfile.check_target(args.export_logits, "--export-logits")  # now, not after the logits are computed
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not Path(path).absolute().parent.is_dir():
            raise UserError(f"{flag} {path}: the folder {Path(path).absolute().parent} does not exist")
    args.runs = args.runs or ["runs/latest"]


def check_prior(counts, run_dir, args):
    """Post-hoc adjustment subtracts tau * log(prior): a class without training images (in a run trained before
    data.prepare refused a rho that empties one) has log(0) = -inf. Checked before any logits are computed."""
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty and (args.posthoc or args.tau_sweep):
        raise UserError(f"{run_dir.name}: class {empty[0]} had no training image, so its log-prior is -inf and "
                        f"post-hoc adjustment is undefined; evaluate it without --posthoc and --tau-sweep")


def read_cache(cache):
    """The logits cache as a dict, or None where there is none or it is unreadable; a cache that asks to import
    code is a UserError (someone else's file, to be reported rather than overwritten)."""
    if not cache.is_file():
        return None
    try:
        cached = checkpoint.load_plain(cache, "logits cache")
    except UserError:
        raise
    except Exception:
        return None
    return cached if isinstance(cached, dict) else None


def load_logits(run_dir, ckpt_path, args, ctx):
    """The logits cache entry for this checkpoint: {"splits": {split: (logits, labels)} for val and test,
    "class_counts", "config", "checkpoint_sha256", "checkpoint_state", "computed_with"}; from the cache when it
    belongs to this checkpoint and to the data asked for (other_data), or when the run kept no checkpoint (then it
    is all there is). features.pt follows: it is rewritten whenever the logits are computed."""
    cache = run_dir / "logits.pt"
    cached, sha = read_cache(cache), ckpt_path and checkpoint.file_sha256(ckpt_path)
    if ckpt_path is None and (cached is None or "checkpoint_state" not in cached):
        why = "is unreadable" if cached is None else "does not say how far the run got"
        raise UserError(f"{run_dir} holds no checkpoint.pt, and its logits.pt {why}")
    elsewhere = cached is not None and other_data(cached, args)
    if ckpt_path is None and elsewhere and args.data_root and "data_root" in cached:
        raise UserError(f"{run_dir} holds no checkpoint.pt, only logits computed from the data under "
                        f"{cached['data_root']}, so it cannot be evaluated on --data-root {args.data_root}")
    if cached is not None and (ckpt_path is None or (cached.get("checkpoint_sha256") == sha and not elsewhere)):
        check_prior(cached["class_counts"], run_dir, args)
        if "checkpoint_state" not in cached:  # a cache from before the state was kept (left as it is)
            cached["checkpoint_state"] = checkpoint.progress(checkpoint.load(ckpt_path))
        return {"computed_with": None, **cached}
    ckpt, prec, out = run_checkpoint(ckpt_path, run_dir, args, ctx)
    entry = {"checkpoint_sha256": sha, "splits": {k: (v[0], v[2]) for k, v in out.items()},
             "class_counts": ckpt["class_counts"], "config": ckpt["config"],
             "checkpoint_state": checkpoint.progress(ckpt), "computed_with": provenance.collect(ctx.device, prec),
             "data_root": data_root(ckpt["config"], args)}
    checkpoint.save_atomic(entry, cache)
    save_features(run_dir, ckpt, sha, out, entry["computed_with"])
    return entry


def data_root(config_dict, args):
    """The data a run's logits are computed from now (config.data_root's rule), as an absolute path."""
    return str(Path(config.data_root(args.data_root, config_dict.get("data", {}).get("root", "./data"))).resolve())


def other_data(cached, args):
    """Whether a logits cache was computed from other data than the data asked for now: another data root (a
    copy under another path counts as other: it is recomputed, and checked against the checkpoint's split). A
    cache from before the root was kept is taken as the run's own data unless --data-root is given."""
    if "data_root" not in cached:
        return args.data_root is not None
    return cached["data_root"] != data_root(cached.get("config", {}), args)


def run_checkpoint(ckpt_path, run_dir, args, ctx):
    """Load a checkpoint and its data split; return (checkpoint, precision, {split: (logits, features, labels)})
    for val and test, the penultimate features being what the classifier reads."""
    ckpt = checkpoint.load(ckpt_path)
    check_prior(ckpt["class_counts"], run_dir, args)
    cfg = config.from_dict(ckpt["config"])
    cfg.data.root = config.data_root(args.data_root, cfg.data.root)
    splits = data.prepare(cfg.data, allow_empty_classes=True)  # raw metrics of such a run still mean something
    if ckpt.get("split_manifest") is not None and not data.same_split(ckpt["split_manifest"], splits.manifest):
        raise UserError(f"the data under {cfg.data.root} does not give the split {ckpt_path} was trained on")
    model = build.model(cfg, len(splits.counts), ctx.device, training=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint {ckpt_path} does not fit a {cfg.model.name}: {str(e).splitlines()[0]}")
    rt = runtime.for_evaluation(cfg.train, ckpt.get("runtime"), ctx.device)
    out = {}
    for name, x, y in (("val", splits.val_x, splits.val_y), ("test", splits.test_x, splits.test_y)):
        if len(y):
            logits, feats = engine.compute_logits(model, x, rt, args.batch_size, features=True, normalize=cfg.data.normalize)
            out[name] = (logits, feats, torch.as_tensor(y))
    return ckpt, rt.precision, out


def save_features(run_dir, ckpt, sha, out, computed_with):
    """features.pt, beside logits.pt and keyed to the checkpoint the same way: the penultimate features and the
    linear classifier's weights, all weight normalisation needs (a cosine classifier has nothing to rescale).
    Returns what it saved, or None."""
    head = {k[len("fc."):]: v.float() for k, v in ckpt["model"].items() if k.startswith("fc.")}
    if "bias" not in head:
        return None
    entry = {"checkpoint_sha256": sha, "splits": {k: (v[1], v[2]) for k, v in out.items()}, "fc": head,
             "computed_with": computed_with}
    checkpoint.save_atomic(entry, run_dir / "features.pt")
    return entry


def load_features(run_dir, ckpt_path, sha, loss_name, args, ctx):
    """The features cache for this checkpoint ({"splits": {split: (features, labels)}, "fc": {weight, bias}}),
    computed if absent; None, with the reason printed, where weight normalisation cannot be done."""
    if loss_name == "ldam":
        print(f"\nweight normalisation: {run_dir.name} has a cosine classifier (--loss ldam), whose weights are "
              f"normalised already")
        return None
    if ckpt_path is None:
        print(f"\nweight normalisation: {run_dir.name} was kept without its checkpoint, so its features cannot be computed")
        return None
    cached = read_cache(run_dir / "features.pt")
    if cached is None or cached.get("checkpoint_sha256") != sha:
        ckpt, prec, out = run_checkpoint(ckpt_path, run_dir, args, ctx)
        cached = save_features(run_dir, ckpt, sha, out, provenance.collect(ctx.device, prec))
    return cached


def fmt(v):
    """A number, an interval [low, high] as low-high, or absent."""
    if v is None:
        return "absent"
    return f"{v[0]:.2f}-{v[1]:.2f}" if isinstance(v, list) else f"{v:.2f}"


def print_table(title, columns, counts=None, rows=ROWS):
    """columns: {label: metrics dict}; per-class rows when counts are given."""
    labels = list(columns)
    width = max(14, *(len(l) + 2 for l in labels))
    print(f"\n{title}")
    print(f"{'':22s}" + "".join(f"{l:>{width}s}" for l in labels))
    for key, name in rows:
        print(f"{name:22s}" + "".join(f"{fmt(columns[l][key]):>{width}s}" for l in labels))
    if counts is None:
        return
    print("per-class accuracy (class: train images)")
    for c, n in enumerate(counts):
        print(f"  {c:3d}: {n:5d}".ljust(22) + "".join(f"{fmt(columns[l]['per_class'][c]):>{width}s}" for l in labels))


def evaluate_split(run_dir, split, logits, labels, counts, args, trained, loss_tau, wnorm=None):
    """Raw, (with --posthoc) post-hoc and (with wnorm, the split's features and the classifier's weights)
    weight-normalised metrics of one split, printed and returned for eval.json."""
    log_pi = losses.log_prior(counts)
    columns = {"raw": metrics.evaluate_logits(logits, labels, counts)}
    report = {"raw": columns["raw"]}
    if args.posthoc:
        label = f"post-hoc tau={args.tau:g}" + (f" (total {loss_tau + args.tau:g})" if loss_tau else "")
        columns[label] = metrics.evaluate_logits(losses.posthoc_adjust(logits, log_pi, args.tau), labels, counts)
        report["posthoc"] = {"tau": args.tau, "total_tau": loss_tau + args.tau, **columns[label]}
    if wnorm is not None:
        label = f"wnorm T={args.wnorm_tau:g}"
        columns[label] = metrics.evaluate_logits(losses.weight_normalized_logits(*wnorm, args.wnorm_tau), labels, counts)
        report["wnorm"] = {"tau": args.wnorm_tau, **columns[label]}
    if split == "test":
        print_table(f"{run_dir.name}: test set ({len(labels)} images), trained with {trained}", columns, counts)
    else:
        print_table(f"{run_dir.name}: validation split ({len(labels)} images, held out of training)", columns,
                    rows=ACCURACY_ROWS)
    return report


def tau_sweep(splits, counts, args, loss_tau):
    """The sweep's three labelled results (without a validation split, two), printed."""
    sweep = tausweep.sweep(splits.get("val"), splits["test"], losses.log_prior(counts), args.taus, args.tau_rule, loss_tau)
    print(tausweep.describe(sweep))
    return sweep


def plot_tau_sweep(png, name, sweep, trained, state):
    from la import plots

    unfinished = "" if state["finished"] else f", UNFINISHED: {checkpoint.describe_progress(state)}"
    plots.tau_curve(sweep, png, f"{name} (trained with {trained}{unfinished})")
    print(f"plot: {png}")


def report_splits(run_dir, splits, counts, args, trained, loss_tau, feats=None):
    """The report of one model's logits, a run's or a file's: each split's table, and with --tau-sweep the sweep."""
    report = {}
    for split in ("test", "val"):
        if split in splits:
            wnorm = feats and args.wnorm_tau is not None and (feats["splits"][split][0], feats["fc"]["weight"])
            report[split] = evaluate_split(run_dir, split, *splits[split], counts, args, trained, loss_tau, wnorm or None)
    if args.tau_sweep:
        report["tau_sweep"] = tau_sweep(splits, counts, args, loss_tau)
    return report


def evaluate_run(path, args, ctx):
    run_dir, ckpt_path = rundir.resolve(path)
    entry = load_logits(run_dir, ckpt_path, args, ctx)
    splits, counts, cfg_dict, state = entry["splits"], entry["class_counts"], entry["config"], entry["checkpoint_state"]
    loss_name, method = cfg_dict["loss"]["name"], config.method_name(config.from_dict(cfg_dict).loss)
    trained = f"--loss {loss_name}" + (" --drw" if method.endswith("-drw") else "")  # as the run was started
    loss_tau = float(cfg_dict["loss"]["tau"]) if loss_name == "la" else 0.0  # the shift the loss already made
    training = rundir.holder(run_dir)  # read, not written: eval.py writes none of the files training writes
    if not state["finished"] or training:
        print(f"\nUNFINISHED RUN: {run_dir.name}'s checkpoint is at {checkpoint.describe_progress(state)}"
              + (f", and it is training now ({training})" if training else "")
              + "; these are the numbers of a partly trained model")
    if args.posthoc and loss_tau:
        print(f"\nnote: {run_dir.name} was trained with the logit-adjusted loss (tau={loss_tau:g}); post-hoc "
              f"tau={args.tau:g} on top shifts its logits by a total of {loss_tau + args.tau:g} x log prior")
    report = {"run": str(run_dir), "checkpoint": ckpt_path and str(ckpt_path), "checkpoint_sha256": entry["checkpoint_sha256"],
              **state, "loss": loss_name, "method": method, "loss_tau": loss_tau, "class_counts": counts,
              "evaluated_with": {**provenance.git_state(), "argv": list(sys.argv), "torch": str(torch.__version__)},
              "logits_computed_with": entry["computed_with"]}
    # weight normalisation needs penultimate features: asked for, or beside the sweep of a plain CE run
    wants_wnorm = args.wnorm_tau is not None or (args.tau_sweep and method == "ce")
    feats = load_features(run_dir, ckpt_path, entry["checkpoint_sha256"], loss_name, args, ctx) if wants_wnorm else None
    if args.tau_sweep and "val" not in splits:
        raise UserError(f"{run_dir.name} has no validation split (val_per_class=0): tau cannot be chosen fairly")
    report.update(report_splits(run_dir, splits, counts, args, trained, loss_tau, feats))
    if args.tau_sweep and feats and method == "ce":
        report["wnorm_sweep"] = tausweep.wnorm_sweep(feats["splits"]["val"], feats["splits"]["test"],
                                                     feats["fc"]["weight"], args.taus)
        print(tausweep.describe_wnorm(report["wnorm_sweep"]))
    written = rundir.save_report(run_dir, report)
    if args.tau_sweep and (written or not (run_dir / "tau_sweep.png").exists()):  # its plot changes with eval.json
        plot_tau_sweep(run_dir / "tau_sweep.png", run_dir.name, report["tau_sweep"], trained, state)
    return report


FILE_TRAINED = "an unknown recipe (logits read from a file)"


def evaluate_file(path, args):
    """--logits FILE: the report of any model's logits, through the same tables and sweep as a run's."""
    splits, counts = logitsfile.load(path)
    path = Path(path)
    if "val" not in splits:
        print(f"\nnote: {path.name} holds no val_logits, so no tau is chosen on validation: tau = 1 and the "
              f"test-tuned oracle are shown, and the oracle is no fair result")
    png = args.plot and Path(args.plot).with_suffix(".tau_sweep.png")  # beside the per-class chart, if asked for
    report = {"run": str(path.resolve()), "loss": "file", "loss_tau": 0.0, "class_counts": counts,
              **report_splits(path, splits, counts, args, FILE_TRAINED, 0.0)}
    if png:
        plot_tau_sweep(png, path.name, report["tau_sweep"], FILE_TRAINED, {"finished": True})
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        except OSError as e:
            raise UserError(f"could not write --json {args.json} ({e.strerror or e})")
    return report


def export_run(path, args, ctx):
    """--export-logits FILE: a run's val and test logits and training counts in the format --logits reads."""
    run_dir, ckpt_path = rundir.resolve(path)
    entry = load_logits(run_dir, ckpt_path, args, ctx)
    logitsfile.export(entry["splits"], entry["class_counts"], args.export_logits)
    state = entry["checkpoint_state"]
    unfinished = "" if state["finished"] else f" (UNFINISHED: {checkpoint.describe_progress(state)})"
    print(f"{run_dir.name}{unfinished}: {', '.join(f'{k} {len(v[1])} images' for k, v in entry['splits'].items())} "
          f"-> {args.export_logits}; python eval.py --logits {args.export_logits} reports them")
    return 0


def main(argv):
    args = parse_args(argv)
    ctx = dist.Context(0, 0, 1, torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if args.export_logits:
        return export_run(args.runs[0], args, ctx)
    reports = [evaluate_file(args.logits, args)] if args.logits else [evaluate_run(p, args, ctx) for p in args.runs]
    if args.plot:
        from la import plots

        try:
            plots.per_class(reports, args.plot)
        except OSError as e:
            raise UserError(f"could not write --plot {args.plot} ({e.strerror or e}); each run's eval.json is written")
        print(f"per-class chart: {args.plot}")
    return 0


if __name__ == "__main__":
    run_cli(main)
