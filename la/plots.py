"""PNG figures: balanced accuracy against tau, per-class accuracy head to tail, accuracy against rho."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tau_curve(sweep, path, title):
    """Balanced accuracy and validation NLL against tau (without validation curves where sweep has none)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    has_val = sweep["validation_chosen"] is not None
    if has_val:
        ax.plot(sweep["taus"], sweep["val_balanced_acc"], label="validation (balanced, from unused train images)")
    ax.plot(sweep["taus"], sweep["test_balanced_acc"], label="test")
    rule = has_val and sweep["validation_chosen"]["rule"]
    for key, style, label in (("validation_chosen", "--", f"chosen on validation ({rule})"),
                              ("oracle_test_tuned", ":", "oracle")):
        if sweep[key] is not None:
            ax.axvline(sweep[key]["tau"], linestyle=style, color="gray", label=f"{label} = {sweep[key]['tau']:g}")
    la = sweep["loss_tau"] != 0
    xlabel = f"extra post-hoc t (total tau {sweep['loss_tau']:g} + t)" if la else "post-hoc tau"
    ax.set(xlabel=xlabel, ylabel="balanced accuracy (%)", title=title)
    ax.legend(fontsize=7, loc="lower left")
    if not has_val:
        return _save(fig, path)
    nll = ax.twinx()
    nll.plot(sweep["taus"], sweep["val_balanced_nll"], color="tab:red", alpha=0.4, linewidth=1)
    nll.set_ylabel("validation balanced NLL", color="tab:red")
    _save(fig, path)


def per_class(reports, path):
    """One series per result (CE raw, CE post-hoc, LA raw, ...), classes head to tail by training count."""
    fig, ax = plt.subplots(figsize=(max(6, len(reports[0]["class_counts"]) * 0.08 + 4), 4))
    counts = reports[0]["class_counts"]
    order = sorted(range(len(counts)), key=lambda c: -counts[c])
    for r in reports:
        raw = {"ce": "CE", "file": "logits"}.get(r["loss"], "LA loss")  # "file": eval.py --logits
        series = [("raw", raw)]
        if "posthoc" in r["test"] and r["loss"] in ("ce", "file"):
            series.append(("posthoc", f"{raw} + post-hoc (tau={r['test']['posthoc']['tau']:g})"))
        unfinished = f" [UNFINISHED: epoch {r['epoch']} of {r['epochs']}]" if r.get("finished") is False else ""
        for key, label in series:
            acc = [r["test"][key]["per_class"][c] for c in order]
            ax.plot(range(len(order)), acc, marker="o", markersize=3,
                    label=f"{label}: balanced {r['test'][key]['balanced_acc']:.1f}%{unfinished}")
    ax.set(xlabel="class, head to tail (training images)", ylabel="test accuracy (%)", ylim=(0, 100))
    if len(order) <= 20:
        ax.set_xticks(range(len(order)), [f"{c}\n({counts[c]})" for c in order], fontsize=7)
    ax.legend(fontsize=8)
    _save(fig, path)


def rho_curve(table, path, title):
    """table: {method: {rho: (mean, std)}}."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, cells in table.items():
        rhos = sorted(cells)
        ax.errorbar([str(r) for r in rhos], [cells[r][0] for r in rhos], yerr=[cells[r][1] for r in rhos],
                    marker="o", capsize=3, label=method)
    ax.set(xlabel="imbalance ratio rho", ylabel="test top-1 (%)", title=title)
    ax.legend(fontsize=8)
    _save(fig, path)
