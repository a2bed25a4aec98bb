"""Where and how every committed run trained: one table, from each run's own files.

    python scripts/provenance_table.py           # the table, as markdown
    python scripts/provenance_table.py --write   # put it into RESULTS.md, between its provenance markers
    python scripts/provenance_table.py --check   # exit 1 unless RESULTS.md holds exactly this table

A run is a folder under results/ with a metrics.jsonl, except under results/in_progress/ (training state, not yet
a result). Per run: the commit of each start and resume, the hardware (each in turn, where a resume moved it),
the precision, whether the step was compiled, how many times it was resumed, and the training time (the sum of its
epochs' seconds in metrics.jsonl, evaluation excluded). Commits, hardware and resumes come from provenance.json,
precision and compile from runtime.json, else config.yaml; what a run trained before those files existed does not
record comes from results/provenance_notes.json, as does each CPU's flags.
"""
import itertools
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
NOTES = "provenance_notes.json"
UNKNOWN = "—"


def notes():
    path = RESULTS / NOTES
    return json.loads(path.read_text()) if path.exists() else {"runs": {}, "flags": {}}


def flags_of(name, flags):
    """The CPU flags noted for a run, or for the folder of runs it belongs to."""
    while name:
        if name in flags:
            return flags[name]
        name = name.rpartition("/")[0]
    return None


def describe(run_dir, note, flags):
    """(run, commits, hardware, precision, compiled, resumes, training time) of one run folder."""
    name = run_dir.relative_to(RESULTS).as_posix()
    commits, device, resumes = note.get("commits"), note.get("device"), note.get("resumes")
    if (run_dir / "provenance.json").exists():
        sessions = json.loads((run_dir / "provenance.json").read_text())["sessions"]
        commits = list(dict.fromkeys(s["git_commit"][:7] for s in sessions if s["git_commit"]))
        # a run resumed on other hardware lists each, in order (consecutive starts on one machine once)
        device = ", then ".join(d for d, _ in itertools.groupby(s["device"] for s in sessions))
        resumes = len(sessions) - 1
    precision, compiled = note.get("precision"), note.get("compiled")
    if (run_dir / "runtime.json").exists():
        runtime = json.loads((run_dir / "runtime.json").read_text())
        precision = runtime["precision"]
        compiled = "CUDA graph" if runtime.get("cuda_graph") else runtime["compile"]
    train = yaml.safe_load((run_dir / "config.yaml").read_text()).get("train", {})
    if precision is None and train.get("precision") != "auto":
        precision = train.get("precision")
    if compiled is None and str(train.get("compile")).lower() in ("true", "false"):
        compiled = str(train["compile"]).lower() == "true"
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = sum(e["seconds"] for e in epochs)
    cpu_flags = flags_of(name, flags)
    hardware = (device or UNKNOWN) + (f" ({cpu_flags})" if cpu_flags else "")
    return (f"`{name}`", ", ".join(commits) if commits else UNKNOWN, hardware, precision or UNKNOWN,
            {True: "yes", False: "no", None: UNKNOWN}.get(compiled, compiled),
            UNKNOWN if resumes is None else str(resumes), f"{len(epochs)} epochs, {duration(seconds)}")


def duration(seconds):
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.1f} min"


def runs():
    return sorted(p.parent for p in RESULTS.rglob("metrics.jsonl") if "in_progress" not in p.relative_to(RESULTS).parts)


def table():
    n = notes()
    lines = ["| run | commit of each start and resume | hardware | precision | compiled | resumes | training time |",
             "|---|---|---|---|---|---|---|"]
    for run_dir in runs():
        note = n["runs"].get(run_dir.relative_to(RESULTS).as_posix(), {})
        lines.append("| " + " | ".join(describe(run_dir, note, n["flags"])) + " |")
    return "\n".join(lines)


def main(argv):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import table3  # its --write / --check and marker convention: <!-- table3 NAME --> ... <!-- /table3 -->

    return table3.generate(argv, lambda: {"RESULTS.md": {"provenance": table()}}, __doc__.split("\n")[0],
                           "provenance_table.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
