"""Write the generated part of ``docs/results.md`` from the study's runs (``make study`` calls it at the end).

    .venv/bin/python study/report.py                 # reads runs/study/<table>/results.json for every study/*.yaml

For each table (one ``study/<table>.yaml``, one ``ddcnn compare`` run) it writes the command, the settings, the
accuracy and cost tables of ``ddcnn compare``, the paired differences that test the papers' claims, and the plots
(copied to ``docs/results/<table>/``). The text between the ``<!-- study:begin -->`` and ``<!-- study:end -->``
markers of ``docs/results.md`` is replaced; everything outside them (the verdicts, written by hand from these numbers)
is kept. A table whose run has not finished is listed as such; a table with no run on this machine keeps the section it
had (the study's tables ran in several sessions).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
try:
    import ddcnn  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))

from ddcnn.compare import CompareConfig  # noqa: E402
from ddcnn.config import config_from_dict, grid_order, load_yaml  # noqa: E402
from ddcnn.tables import mean_std_cell, methods_by_grids, per_seed, results_markdown, summarize  # noqa: E402

TABLES = (
    "cifar10_vgg9",
    "cifar10_vgg9_overlap",
    "cifar10_resnet20",
    "tf_flowers",
    "tf_flowers_crossfit",
    "adrenalmnist3d",
    "adrenalmnist3d_balanced",
    "tf_flowers_densenet121",
    "cifar10_full",
    "cifar10_full_coarse",
)
# a table that changes one setting of another: its methods are compared with that table's, seed by seed
BASELINES = {
    "cifar10_vgg9_overlap": "cifar10_vgg9",
    "tf_flowers_crossfit": "tf_flowers",
    "cifar10_full_coarse": "cifar10_full",
}
# tables with imbalanced classes, where accuracy alone misleads (predicting the majority class scores 77% there):
# the same tables again for these metrics of the test split
MORE_METRICS = {name: ("test_balanced_accuracy", "test_auc") for name in ("adrenalmnist3d", "adrenalmnist3d_balanced")}
BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
SIGNED = "{:+.4f}"  # a difference: mean signed, std not
PLOTS = ("accuracy.png", "subdomains.png")
# (name, method a, method b): the paired difference a - b, per grid
DIFFERENCES = (
    ("dnn - mean", "dnn", "mean"),
    ("dnn - vote", "dnn", "vote"),
    ("transfer - coherent", "transfer", "coherent"),
    ("dnn - global", "dnn", "global"),
    ("transfer - global", "transfer", "global"),
    ("coherent - global", "coherent", "global"),
)


def paired_cell(first: dict[int, float], second: dict[int, float]) -> str:
    """``first - second`` paired by seed (``{seed: value}``): mean ± std over the seeds both have, and in brackets
    in how many of them the difference is positive; empty if they share no seed."""
    seeds = sorted(set(first) & set(second))
    if not seeds:
        return ""
    diffs = [first[s] - second[s] for s in seeds]
    return f"{mean_std_cell(diffs, SIGNED)} ({sum(d > 0 for d in diffs)}/{len(seeds)})"


def metric_markdown(rows: list[dict[str, Any]], key: str) -> list[str]:
    """Methods by grids, mean ± std over seeds, of the metric ``key`` (a field of the rows)."""
    return methods_by_grids(summarize(rows, key), label=key.replace("_", " ")) + [""]


def differences_markdown(rows: list[dict[str, Any]], grids: list[str], key: str = "test_accuracy") -> list[str]:
    """Paired (same seed) differences of ``key`` for the claims, per grid: mean ± std and in how many seeds a > b."""
    acc = per_seed(rows, key)
    lines = [
        f"| difference of {key.replace('_', ' ')} (paired by seed) | " + " | ".join(grids) + " |",
        "|---|" + "---:|" * len(grids),
    ]
    for name, a, b in DIFFERENCES:
        cells = [
            paired_cell(acc.get((a, grid), {}), acc.get((b, "1x1" if b == "global" else grid), {})) for grid in grids
        ]
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "In brackets: the seeds in which the first method is more accurate, of the seeds both ran.", ""]
    return lines


def against_baseline_markdown(rows: list[dict[str, Any]], base_rows: list[dict[str, Any]], base: str) -> list[str]:
    """Paired (same seed) differences of every method's test accuracy from the same method in table ``base``."""
    acc, base_acc = per_seed(rows), per_seed(base_rows)
    grids = sorted({grid for _, grid in acc}, key=grid_order)
    lines = [
        f"| test accuracy minus {base}'s (paired by seed) | " + " | ".join(grids) + " |",
        "|---|" + "---:|" * len(grids),
    ]
    for method in dict.fromkeys(m for m, _ in acc):
        cells = [paired_cell(acc.get((method, grid), {}), base_acc.get((method, grid), {})) for grid in grids]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + ["", "In brackets: the seeds in which this table's method is more accurate.", ""]


def best_markdown(rows: list[dict[str, Any]], grids: list[str], cc: CompareConfig) -> list[str]:
    """The most accurate combination of the frozen local CNNs per grid, and the local phase's cost per epoch."""
    accuracy = summarize(rows)
    seconds = summarize(rows, "train_seconds")
    aggregators = [m for m in accuracy if m not in ("global", "local", "coherent", "transfer")]
    lines = []
    global_seconds = seconds.get("global", {}).get("1x1")
    for grid in grids:
        ranked = sorted(
            ((statistics.mean(accuracy[m][grid]), m) for m in aggregators if grid in accuracy[m]), reverse=True
        )
        if ranked:
            order = ", ".join(f"{m} {a:.4f}" for a, m in ranked)
            lines.append(f"- {grid}, aggregators by mean test accuracy: {order}.")
        local_seconds = seconds.get("local", {}).get(grid)
        if local_seconds and global_seconds:
            # the fastest seed: timings on a shared machine only ever get slower
            local_epoch = min(local_seconds) / cc.phase_epochs("local")
            global_epoch = min(global_seconds) / cc.phase_epochs("global")
            lines.append(
                f"- {grid}, one process, fastest seed: an epoch of the local phase (all local CNNs) took "
                f"{local_epoch:.1f} s, an epoch of the global CNN {global_epoch:.1f} s (ratio "
                f"{local_epoch / global_epoch:.2f})."
            )
    return lines + [""] if lines else []


def dataset_label(spec: str) -> str:
    """``cifar10:PATH`` -> cifar10; for the generic readers the file's name: ``npz:.../adrenalmnist3d_28.npz`` ->
    adrenalmnist3d_28."""
    kind, _, path = spec.partition(":")
    if kind in ("npz", "imagefolder") and path:
        return Path(path).name.split(".")[0]
    return kind


def results_path(name: str) -> Path:
    """Where the run of table ``name`` writes its results.json (the ``out`` of ``study/<name>.yaml``)."""
    return ROOT / config_from_dict(CompareConfig, load_yaml(ROOT / "study" / f"{name}.yaml")).out / "results.json"


def table_section(name: str, out_dir: Path) -> list[str]:
    config_path = ROOT / "study" / f"{name}.yaml"
    title = config_path.read_text().splitlines()[0].lstrip("# ").strip()
    title = title.replace("Study table", "Table").replace(" (docs/results.md)", "")
    cc = config_from_dict(CompareConfig, load_yaml(config_path))
    results = results_path(name)
    lines = [f"### {title}", "", f"Command: `ddcnn compare --config study/{name}.yaml` ({cc.data.dataset}).", ""]
    if not results.is_file():
        return lines + ["_Not run yet: no results.json._", ""]
    report = json.loads(results.read_text())
    rows = report["rows"]
    cc = config_from_dict(CompareConfig, report["config"])
    done = sorted({r["seed"] for r in rows})
    if done != sorted(cc.seeds):
        lines += [f"_Partial: seeds {done} of {list(cc.seeds)} finished._", ""]
    if cc.data.limit_train:
        sample = f"a stratified sample of {cc.data.limit_train:,} (`limit_train`, split seed {cc.data.split_seed})"
        lines += [f"Training images: {sample}.", ""]
    body = results_markdown(rows, cc, dataset_label(cc.data.dataset))
    lines += ["#" * 3 + line if line.startswith("#") else line for line in body.splitlines()]
    grids = sorted({r["grid"] for r in rows if r["grid"] != "1x1"}, key=grid_order)
    lines += ["", "#### Claims, measured", ""] + differences_markdown(rows, grids) + best_markdown(rows, grids, cc)
    for key in MORE_METRICS.get(name, ()):
        lines += metric_markdown(rows, key) + differences_markdown(rows, grids, key)
    base = BASELINES.get(name)
    if base is not None and results_path(base).is_file():
        base_rows = json.loads(results_path(base).read_text())["rows"]
        lines += against_baseline_markdown(rows, base_rows, base)
    plot_dir = out_dir / name
    plot_dir.mkdir(parents=True, exist_ok=True)
    for plot in PLOTS:
        source = results.parent / plot
        if source.is_file():
            shutil.copyfile(source, plot_dir / plot)
            lines += [f"![{plot[:-4]} ({name})](results/{name}/{plot})", ""]
    return lines


def previous_sections(generated: str) -> dict[str, list[str]]:
    """The sections of the generated part of docs/results.md by table name: each runs from its ``### `` heading to
    the next, and is named by its ``Command: `ddcnn compare --config study/<name>.yaml``` line."""
    sections: dict[str, list[str]] = {}
    lines, current = generated.strip("\n").splitlines(), None
    for line in lines:
        if line.startswith("### "):
            current = []
        if current is None:
            continue
        current.append(line)
        if line.startswith("Command: `ddcnn compare --config study/"):
            sections[line.split("study/", 1)[1].split(".yaml", 1)[0]] = current
    return sections


def main() -> int:
    doc = ROOT / "docs" / "results.md"
    text = doc.read_text() if doc.is_file() else f"# Results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        print(f"{doc} lacks the markers {BEGIN} and {END}; add them where the tables go", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    generated, tail = rest.split(END, 1)
    previous = previous_sections(generated)
    sections = []
    for name in TABLES:
        if not results_path(name).is_file() and name in previous:
            # no run of this table here (the study ran over several machines and sessions): keep what it reported
            print(f"kept table {name}: no {results_path(name).relative_to(ROOT)} here", file=sys.stderr)
            sections += previous[name]
        else:
            sections += table_section(name, doc.parent / "results")
    doc.write_text(head + BEGIN + "\n" + "\n".join(sections) + "\n" + END + tail)
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
