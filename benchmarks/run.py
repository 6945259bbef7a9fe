"""Run the performance benchmarks and write ``results.json`` and ``results.md`` (``make bench``).

    .venv/bin/python benchmarks/run.py                  # all benchmarks on the CPU (about 20 minutes on 2 cores)
    .venv/bin/python benchmarks/run.py --quick          # fewer configurations and rounds (about 4 minutes)
    .venv/bin/python benchmarks/run.py --only batched   # one benchmark (comma-separate several); others are kept
    .venv/bin/python benchmarks/run.py --device cuda    # the GPU version: bf16 autocast, channels-last, batch 512
    .venv/bin/python benchmarks/run.py --only compile   # --compile's compile time and steps/s (not in the default run)
    .venv/bin/python benchmarks/run.py --only cluster   # the emulated cluster, as root (= make bench-cluster)

Results of a CPU run go to ``benchmarks/results.{json,md}``, of a CUDA run to ``benchmarks/results-cuda.{json,md}``.
With ``--only``, the other benchmarks' earlier results in those files are kept (each carries its own date).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
try:
    import ddcnn  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

import bench_backbones  # noqa: E402
import bench_batched  # noqa: E402
import bench_compile  # noqa: E402
import bench_data  # noqa: E402
import bench_flops  # noqa: E402
import bench_memory  # noqa: E402
import bench_memory_grid  # noqa: E402
import bench_optimisations  # noqa: E402
import bench_overheads  # noqa: E402
import bench_parallel  # noqa: E402
import bench_time_to_accuracy  # noqa: E402
import cluster  # noqa: E402
from common import Goal, Result, Settings, machine  # noqa: E402

BENCHMARKS = {
    m.NAME: m
    for m in (
        bench_time_to_accuracy,  # the headline
        bench_parallel,
        bench_batched,
        bench_backbones,
        bench_data,
        bench_flops,
        bench_memory,
        bench_memory_grid,
        bench_overheads,
        bench_optimisations,
        bench_compile,  # only with --compile or --only compile: compiling takes minutes on CPU
        cluster,  # only with --only cluster (make bench-cluster): root, network namespaces, about 40 minutes
    )
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    default = [n for n in BENCHMARKS if (n != bench_compile.NAME or args.compile) and n != cluster.NAME]
    names = default if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for but CUDA is not available", file=sys.stderr)
        return 2
    settings = Settings(quick=args.quick, device=device)
    stem = "results" if device.type == "cpu" else f"results-{device.type}"
    json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
    report = _load(json_path)
    report["machine"] = machine(settings)
    failed = False
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            if name == bench_optimisations.NAME:
                result = bench_optimisations.run(settings, compile_model=args.compile)
            else:
                result = BENCHMARKS[name].run(settings)
        except Exception:  # a failing benchmark is reported, and the others still run
            failed = True
            result = Result(name, f"{name}: FAILED", [], notes=[traceback.format_exc()])
        result.seconds = time.perf_counter() - start
        print(f"[bench] {name}: {result.seconds:.0f} s", file=sys.stderr, flush=True)
        report["results"][name] = _entry(result, settings, report)
        args.out.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        md_path.write_text(to_markdown(report))
    print(to_markdown(report))
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer configurations and rounds (about 4 minutes on CPU)")
    p.add_argument("--only", default="", help=f"comma-separated benchmarks to run, of: {', '.join(BENCHMARKS)}")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--compile", action="store_true",
                   help="also measure torch.compile: the compile benchmark and a row of optimisations (minutes)")
    p.add_argument("--out", type=Path, default=HERE, help="folder for results.json and results.md")
    return p


def _entry(result: Result, settings: Settings, report: dict[str, Any]) -> dict[str, Any]:
    entry = asdict(result)
    entry["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entry["quick"] = settings.quick
    entry["load_average"] = report["machine"].get("load_average")
    return entry


def record(result: Result, settings: Settings, out: Path = HERE) -> dict[str, Any]:
    """Add ``result`` of a benchmark run on its own (``cluster.py``) to ``results.{json,md}`` in ``out``, keeping
    the other benchmarks' results; returns the whole report."""
    stem = "results" if settings.device.type == "cpu" else f"results-{settings.device.type}"
    report = _load(out / f"{stem}.json")
    report["machine"] = machine(settings)
    report["results"][result.name] = _entry(result, settings, report)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(to_markdown(report))
    return report


def _load(path: Path) -> dict[str, Any]:
    """Earlier results (kept for the benchmarks not run now), or an empty report."""
    if path.exists():
        try:
            report = json.loads(path.read_text())
            if isinstance(report.get("results"), dict):
                return report
        except json.JSONDecodeError:
            pass
    return {"results": {}}


def to_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: the machine, the goals, then one table per benchmark."""
    m = report["machine"]
    lines = ["# Benchmark results", ""]
    device = m.get("gpu", m.get("device"))
    lines += _table(
        ["CPU", "cores", "torch", "threads", "device", "load average (1, 5, 15 min)"],
        [[m.get("cpu"), m.get("cores"), m.get("torch"), m.get("threads"), device, m.get("load_average")]],
    )
    results = [report["results"][n] for n in BENCHMARKS if n in report["results"]]
    goals = [Goal(**g) for r in results for g in r["goals"]]
    if goals:
        lines += ["", "## Goals", ""]
        lines += _table(
            ["goal", "target", "measured", "met"],
            [[g.name, g.target, g.measured, "yes" if g.met else "**no**"] for g in goals],
        )
    for r in results:
        title = "Optimisations" if r["name"] == bench_optimisations.NAME else r["title"]
        lines += ["", f"## {title}", ""]
        if r["name"] == bench_optimisations.NAME:
            lines += [r["title"].split(": ", 1)[-1].capitalize() + ".", ""]
        quick = ", --quick" if r.get("quick") else ""
        lines += [f"_{r['date']}, {r['seconds']:.0f} s{quick}, load average {r.get('load_average')}_", ""]
        if r["columns"]:
            lines += _table(r["columns"], [[row.get(c, "") for c in r["columns"]] for row in r["rows"]])
        for note in r["notes"]:
            lines += ["", note if "\n" not in note else f"```\n{note}```"]
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return out


if __name__ == "__main__":
    sys.exit(main())
