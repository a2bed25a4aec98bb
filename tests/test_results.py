"""The numbers RESULTS.md's and README.md's result tables quote are the ones the committed runs' eval.json files
hold: a re-evaluation that changes a number, or a hand edit of a table, fails here until the two agree again."""
import json
import re
import shutil
import statistics
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import provenance_table  # noqa: E402
import table3  # noqa: E402


def report(run):
    return json.loads((REPO / "results" / run / "eval.json").read_text())


def section(doc, heading):
    """The text of `doc` under the `## heading...` line, up to the next heading of that level."""
    text = (REPO / doc).read_text()
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def cells(text, label):
    """The cells after the first of the table row starting with `label`."""
    rows = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
    assert len(rows) == 1, f"no single row '{label}'"
    return [c.strip() for c in rows[0].strip("|").split("|")[1:]]


def quoted(cell):
    """(the numbers of a cell outside parentheses, the temperature in its parentheses or None):
    '**80.45** (tau 2.2)' -> ([80.45], 2.2); '76.76 / 79.46' -> ([76.76, 79.46], None)."""
    temperature = re.search(r"\((?:tau|T|t) (\d+(?:\.\d+)?)", cell)
    numbers = re.findall(r"\d+\.\d+", re.sub(r"\([^)]*\)", "", cell))
    return [float(v) for v in numbers], float(temperature.group(1)) if temperature else None


def sweep(rep, kind, which):
    """(test top-1, tau) of a sweep's choice: kind tau_sweep or wnorm_sweep, which validation_chosen or oracle."""
    return rep[kind][which]["test_top1"], rep[kind][which]["tau"]


TABLES = [("RESULTS.md", "CIFAR-10-LT, rho = 100, paper recipe"), ("RESULTS.md", "CIFAR-10-LT, rho = 100, seed recipe")]


def expected_tables():
    """{(doc, section heading): {row label: [what each 'ours' column quotes]}}; a column is a test top-1, or
    (test top-1, temperature) where the cell names the temperature chosen."""
    ce, ce1 = report("paper_cifar10/cifar10-lt_rho100_ce_s0"), report("paper_cifar10/cifar10-lt_rho100_ce_s1")
    gpu, la = report("gpu_h200/cifar10-lt_rho100_ce_s0"), report("paper_cifar10/cifar10-lt_rho100_la_s0")
    seed_ce, seed_la = report("gpu_h200/seed_resnet34_ce_s0"), report("gpu_h200/seed_resnet34_la_s0")
    raw, posthoc = (lambda r: r["test"]["raw"]["top1"]), (lambda r: r["test"]["posthoc"]["top1"])
    ce_runs = (ce, gpu, ce1)
    main = {
        "ERM: plain CE, raw logits": [raw(r) for r in ce_runs],
        "CE + post-hoc, tau = 1": [posthoc(r) for r in ce_runs],
        "CE + post-hoc, tau chosen on validation (rule val-nll)": [sweep(r, "tau_sweep", "validation_chosen") for r in ce_runs],
        "CE + post-hoc, oracle tau*": [sweep(r, "tau_sweep", "oracle_test_tuned") for r in ce_runs],
        "LA loss, tau = 1, raw logits": [raw(la)],
        "LA loss + post-hoc tau = 1 (total shift 2)": [posthoc(la)],
        "LA loss + post-hoc t chosen on validation (rule val-nll)": [sweep(la, "tau_sweep", "validation_chosen")],
    }
    seed = {
        "baseline CE, raw logits": [raw(seed_ce)],
        "CE + post-hoc, tau = 1": [posthoc(seed_ce)],
        "CE + post-hoc, oracle tau*": [sweep(seed_ce, "tau_sweep", "oracle_test_tuned")],
        "LA loss, tau = 1, raw logits": [raw(seed_la)],
    }
    return dict(zip(TABLES, (main, seed)))


@pytest.mark.parametrize("doc, heading", TABLES)
def test_result_tables_quote_the_committed_runs(doc, heading):
    text = section(doc, heading)
    for label, columns in expected_tables()[doc, heading].items():
        row = cells(text, label)
        for i, want in enumerate(columns):
            if isinstance(want, list):  # several numbers in one cell
                assert quoted(row[i])[0] == [round(v, 2) for v in want], f"{doc} '{label}'"
                continue
            top1, tau = want if isinstance(want, tuple) else (want, None)
            assert quoted(row[i]) == ([round(top1, 2)], tau), f"{doc} '{label}', column {i + 1}: {row[i]}"


def test_table3_in_results_and_readme_is_what_the_runs_hold():
    """The seeds tables (scripts/table3.py) are generated; the documents must hold them as generated now."""
    assert table3.main(["--check"]) == 0, "run python scripts/table3.py --write"


def test_table3_follows_eval_json_and_counts_seeds(tmp_path, monkeypatch):
    """A changed eval.json changes the table, and a third seed enters the mean and n."""
    results = tmp_path / "results"
    shutil.copytree(REPO / "results" / "paper_cifar10", results / "paper_cifar10")
    monkeypatch.setattr(table3, "RESULTS", results)
    s2 = results / "paper_cifar10" / "cifar10-lt_rho100_ce_s2"
    if not s2.exists():
        shutil.copytree(results / "paper_cifar10" / "cifar10-lt_rho100_ce_s1", s2)
    runs = [json.loads((results / "paper_cifar10" / f"cifar10-lt_rho100_ce_s{s}" / "eval.json").read_text())
            for s in (0, 1, 2)]
    runs[2]["test"]["raw"]["top1"] = 60.0
    (s2 / "eval.json").write_text(json.dumps(runs[2]))
    row = cells(table3.results_table(), "ERM: plain CE")
    values = [r["test"]["raw"]["top1"] for r in runs]
    assert row[1] == f"**{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n = 3)**"
    assert row[4] == "60.00"
    runs[2]["finished"] = False  # an unfinished run leaves the mean
    (s2 / "eval.json").write_text(json.dumps(runs[2]))
    assert cells(table3.results_table(), "ERM: plain CE")[1].endswith("(n = 2)**")


def test_table3_differences_pair_runs_of_one_schedule(tmp_path, monkeypatch):
    """LDAM-DRW under Cao et al.'s schedule is paired with the LA loss under that schedule, not the paper's."""
    results = tmp_path / "results"
    for name in ("paper_cifar10/cifar10-lt_rho100_la_s0", "cao_cifar10/cifar10-lt_rho100_ldam-drw_s0",
                 "cao_cifar10/cifar10-lt_rho100_la_s0"):
        shutil.copytree(REPO / "results" / name, results / name)
    cao_la = results / "cao_cifar10" / "cifar10-lt_rho100_la_s0" / "eval.json"
    rep = json.loads(cao_la.read_text())
    rep["test"]["raw"]["top1"] = 70.0
    cao_la.write_text(json.dumps(rep))
    monkeypatch.setattr(table3, "RESULTS", results)
    drw = report("cao_cifar10/cifar10-lt_rho100_ldam-drw_s0")["test"]["raw"]["top1"]
    table = table3.differences_table()
    assert cells(table, "LDAM-DRW minus LA loss")[:2] == ["cao", f"{drw - 70.0:+.2f}"]


def test_provenance_table_in_results_is_what_the_runs_hold():
    """Where each run trained (scripts/provenance_table.py) is generated; RESULTS.md must hold it as generated now."""
    assert provenance_table.main(["--check"]) == 0, "run python scripts/provenance_table.py --write"


def test_provenance_table_follows_the_runs_files(tmp_path, monkeypatch):
    """A run's provenance.json gives its commits, hardware and resumes, its metrics.jsonl the training time, and
    the notes file fills in only what an older run does not record."""
    results = tmp_path / "results"
    for name in ("paper_cifar10/cifar10-lt_rho100_la_s1", "paper_cifar10/cifar10-lt_rho100_ce_s0"):
        shutil.copytree(REPO / "results" / name, results / name, ignore=shutil.ignore_patterns("*.pt", "*.png"))
    shutil.copy(REPO / "results" / provenance_table.NOTES, results / provenance_table.NOTES)
    monkeypatch.setattr(provenance_table, "RESULTS", results)
    la = results / "paper_cifar10" / "cifar10-lt_rho100_la_s1"
    prov = json.loads((la / "provenance.json").read_text())
    prov["sessions"][-1].update(git_commit="f" * 40, device="NVIDIA H100 80GB HBM3")
    (la / "provenance.json").write_text(json.dumps(prov))
    (la / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "seconds": 3.0}) + "\n" for e in (1, 2)))
    row = cells(provenance_table.table(), "`paper_cifar10/cifar10-lt_rho100_la_s1`")
    assert row[0] == "127e999, fffffff"
    assert row[1] == "AMD EPYC, then NVIDIA H100 80GB HBM3 (avx512_bf16, no AMX)"  # resumed elsewhere: both named
    assert (row[4], row[5]) == ("2", "2 epochs, 6 s")
    ce = cells(provenance_table.table(), "`paper_cifar10/cifar10-lt_rho100_ce_s0`")
    assert ce[0] == "78c3309, d7290fe" and ce[4] == "1"  # from the notes: the run predates provenance.json
    shutil.copytree(la, results / "in_progress" / "paper_cifar10" / la.name)  # training state, not a result
    assert "in_progress" not in provenance_table.table()


def test_a_run_of_the_authors_recipe_gets_its_own_rows_beside_the_authors_codes_numbers(tmp_path, monkeypatch):
    """results/official_cifar10/ (configs/official_cifar10.yaml) is a schedule of its own, never mixed into the
    paper schedule's mean, and its rows stand beside the authors' code's README numbers."""
    results = tmp_path / "results"
    shutil.copytree(REPO / "results" / "paper_cifar10" / "cifar10-lt_rho100_la_s0",
                    results / "official_cifar10" / "cifar10-lt_rho100_la_s0")
    rep = json.loads((results / "official_cifar10" / "cifar10-lt_rho100_la_s0" / "eval.json").read_text())
    rep["test"]["raw"]["top1"] = 77.5
    (results / "official_cifar10" / "cifar10-lt_rho100_la_s0" / "eval.json").write_text(json.dumps(rep))
    monkeypatch.setattr(table3, "RESULTS", results)
    rows = [line for line in table3.results_table().splitlines() if line.startswith("| LA loss, tau = 1 |")]
    assert len(rows) == 1 and "1,241 epochs" in rows[0]
    row = [c.strip() for c in rows[0].strip("|").split("|")]
    assert row[2] == "**77.50 (n = 1)**" and row[-1] == "77.89"


def test_test_curves_read_each_schedules_finished_runs(tmp_path, monkeypatch):
    """The curves hold every evaluated epoch of a finished run with its schedule's decays, and leave out a run
    that has not finished; the figure is the same file when drawn twice."""
    import test_curves
    results = tmp_path / "results"
    shutil.copytree(REPO / "results" / "paper_cifar10" / "cifar10-lt_rho100_la_s0",
                    results / "paper_cifar10" / "cifar10-lt_rho100_la_s0")
    official = results / "official_cifar10"
    for method, finished in (("la", True), ("ce", False)):
        run = official / f"cifar10-lt_rho100_{method}_s0"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("optim:\n  milestones: [604, 926, 1128]\n")
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 50, "test_top1": 58.5}) + "\n"
                                           + json.dumps({"epoch": 51, "train_loss": 0.3}) + "\n"
                                           + json.dumps({"epoch": 100, "test_top1": 70.69}) + "\n")
        (run / "eval.json").write_text(json.dumps({"finished": finished}))
    monkeypatch.setattr(table3, "RESULTS", results)
    table = test_curves.curves()
    assert list(table) == ["la"]  # no CE run is finished
    assert table["la"]["official"] == ([50, 100], [58.5, 70.69], [604, 926, 1128])
    paper = [json.loads(line) for line in (results / "paper_cifar10" / "cifar10-lt_rho100_la_s0" / "metrics.jsonl")
             .read_text().splitlines()]
    assert table["la"]["paper"][1][-1] == paper[-1]["test_top1"]
    assert table["la"]["paper"][2] == [160, 180]
    test_curves.plot(table, tmp_path / "a.png")
    test_curves.plot(table, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
