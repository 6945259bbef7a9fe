"""study/report.py: the paired differences that docs/results.md's verdicts rest on."""

import importlib.util
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parent.parent / "study" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("study_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows():
    rows = []
    for seed, (glob, dnn, mean, vote) in enumerate([(0.50, 0.60, 0.55, 0.50), (0.52, 0.58, 0.60, 0.51)]):
        rows.append({"method": "global", "grid": "1x1", "seed": seed, "test_accuracy": glob, "train_seconds": 10.0})
        for method, acc in (("dnn", dnn), ("mean", mean), ("vote", vote)):
            rows.append({"method": method, "grid": "2x2", "seed": seed, "test_accuracy": acc})
        for subdomain, acc in enumerate((0.3, 0.4, 0.5, 0.6)):  # local rows are averaged over the subdomains
            rows.append({"method": "local", "grid": "2x2", "seed": seed, "subdomain": subdomain,
                         "test_accuracy": acc, "train_seconds": 30.0})
    return rows


def test_differences_are_paired_by_seed_and_count_the_wins(report):
    lines = report.differences_markdown(_rows(), ["2x2"])
    cells = [line.strip("| ").split(" | ") for line in lines if line.startswith("| d")]
    by_name = {name: value for name, value in cells}
    assert by_name["dnn - mean"] == "+0.0150 ± 0.0495 (1/2)"  # +0.05 and -0.02
    assert by_name["dnn - vote"] == "+0.0850 ± 0.0212 (2/2)"
    assert by_name["dnn - global"] == "+0.0800 ± 0.0283 (2/2)"  # against the 1x1 row of the same seed
    assert "transfer - coherent" not in by_name  # neither was run


def test_per_seed_averages_the_local_cnns(report):
    assert report.per_seed(_rows())["local", "2x2"] == {0: pytest.approx(0.45), 1: pytest.approx(0.45)}


def test_a_variant_table_is_compared_with_its_baseline_seed_by_seed(report):
    base = _rows()
    variant = [{**row, "test_accuracy": row["test_accuracy"] + 0.01} for row in base if row["method"] != "global"]
    lines = report.against_baseline_markdown(variant, base, "base")
    cells = dict(line.strip("| ").split(" | ") for line in lines if line.startswith("| ") and " | " in line)
    assert cells["dnn"] == "+0.0100 ± 0.0000 (2/2)" and cells["local"] == "+0.0100 ± 0.0000 (2/2)"
    assert "global" not in cells  # only the variant's methods


def test_every_study_table_is_run_reported_and_published(report):
    root = REPORT.parent.parent
    configs = {path.stem for path in (root / "study").glob("*.yaml")}
    assert set(report.TABLES) == configs  # report.py writes a section for every config and only those
    study_line = next(line for line in (root / "Makefile").read_text().splitlines() if line.startswith("STUDY ?="))
    assert set(study_line.split("=", 1)[1].split()) == configs  # `make study` runs them all
    results = (root / "docs" / "results.md").read_text()
    for name in configs:
        assert f"Command: `ddcnn compare --config study/{name}.yaml`" in results
    assert "(docs/results.md)" in (root / "README.md").read_text()


def test_a_table_without_a_run_here_keeps_its_section(report, tmp_path, monkeypatch):
    """The study's tables ran in several sessions: regenerating docs/results.md where only some of the runs exist
    keeps the other tables' sections as they were, and rewrites those whose results.json is here."""
    name_kept, name_run = report.TABLES[0], report.TABLES[1]
    kept = ["### Table kept", "", f"Command: `ddcnn compare --config study/{name_kept}.yaml` (x).", "", "| old | 1 |"]
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text("# Results\n\nverdicts\n\n" + report.BEGIN + "\n" + "\n".join(kept) + "\n" + report.END + "\ntail\n")
    assert report.previous_sections(doc.read_text().split(report.BEGIN)[1].split(report.END)[0]) == {name_kept: kept}
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.setattr(report, "TABLES", (name_kept, name_run))
    monkeypatch.setattr(report, "results_path", lambda name: tmp_path / "runs" / name / "results.json")
    monkeypatch.setattr(report, "table_section", lambda name, out_dir: [f"### fresh {name}", ""])
    assert report.main() == 0
    text = doc.read_text()
    assert "\n".join(kept) in text and f"### fresh {name_run}" in text  # kept, and the other one written anew
    assert text.startswith("# Results\n\nverdicts\n\n") and text.endswith("\ntail\n")
