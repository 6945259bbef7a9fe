"""Where the method wins: time to accuracy on an emulated multi-node cluster against the link rate, and the α-β
scaling model (``ddcnn.scaling``) checked against it (issue 14, sections 2 and 3). ``make bench-cluster``.

    sudo .venv/bin/python benchmarks/cluster.py                 # the full run: K = 2 and 4 nodes, five link rates
    sudo .venv/bin/python benchmarks/cluster.py --quick         # a smoke test: K = 2, unshaped and 100 Mbit/s
    sudo .venv/bin/python benchmarks/cluster.py --quick --nodes 4
    sudo .venv/bin/python benchmarks/cluster.py --report        # only write the result of what is measured so far

It needs root and iproute2 (``ip``, ``tc``): without them it says so in one line and exits with status 2. K nodes are
network namespaces on a bridge, every link shaped with ``tc tbf`` (``netns.py``), one ``torchrun`` agent per node
with one process of one thread (``cluster_launch.py``). At every rate it checks the shaping (one TCP stream) and
fits α and β to a gloo all-reduce sweep; once per K it times each process's training step with no communication
(``cluster_probe.py``); then it trains every configuration (``tta_worker.py``): DDP of the global CNN plain, with the
fp16 hook and with PowerSGD; the CNN-DNN 2x2, and 4x4 on 4 nodes, its local phase model parallel and its aggregation
phase counted.

*Cost.* The accuracy after each epoch does not depend on the link (same seed, same arithmetic; the result checks
it), so each configuration is trained to the target end to end only at the points of ``Plan.end_to_end`` (K = 2
unshaped, 1 Gbit/s and 100 Mbit/s, the issue's goal points; K = 4 unshaped), and elsewhere for its first epochs,
its time to the target composed from them (the table says which is which, and checks the composition at the
end-to-end points). The full run takes about 40 minutes on 2 idle cores (docs/scaling.md, "Cost").

*Resumable.* Every finished measurement is saved at once (atomically) under ``--state`` (default
``runs/bench-cluster``, ``runs/bench-cluster-quick`` with ``--quick``); a rerun skips what is there, and measures
again what a changed plan makes stale. The namespaces are removed at the end, on an error and on SIGINT/SIGTERM;
leftovers of a crashed run are removed at the next start.

Outputs: the result in ``benchmarks/results.{json,md}`` (``cluster``), and ``docs/results/cluster/`` (with
``--quick``: ``<state>/figures/``): ``time_to_accuracy.png``, ``scaling.png`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    import ddcnn  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent / "src"))

import cluster_plots
import cluster_report
import netns
from cluster_measure import measure_cluster, point_name
from cluster_plan import CNN_DNN_2X2, CNN_DNN_4X4, FULL, QUICK, Plan, Store, configs, with_ddcnn_defaults
from cluster_scaling import crossover_rate, curves
from common import REPO, Result, Settings

NAME = cluster_report.NAME
FIGURES = REPO / "docs" / "results" / "cluster"
log = logging.getLogger("cluster")


def default_state(quick: bool) -> Path:
    return REPO / "runs" / ("bench-cluster-quick" if quick else "bench-cluster")


def run(settings: Settings, plan: Plan | None = None, state: Path | None = None, measure: bool = True) -> Result:
    """The benchmark (``benchmarks/run.py --only cluster`` calls it so): measure what ``state`` lacks, then the
    result, the figures and ``table.md``."""
    plan = with_ddcnn_defaults(plan or (QUICK if settings.quick else FULL))
    state = state or default_state(settings.quick)
    store = Store(state, plan)
    if measure:
        reason = netns.requirements()
        if reason:
            raise netns.ClusterUnavailable(reason)
        for k in plan.nodes:
            with netns.Cluster(k) as cluster:
                measure_cluster(cluster, plan, store, state / "logs")
    result, points, links = cluster_report.result(plan, store, settings.quick)
    figures = state / "figures" if settings.quick else FIGURES
    figures.mkdir(parents=True, exist_ok=True)
    cluster_plots.time_to_accuracy(points, plan, links, figures / "time_to_accuracy.png")
    # the scaling curves on the compute of 2 nodes (one process per core), else of the fewest nodes measured
    base = 2 if 2 in plan.nodes else plan.nodes[0]
    compute = store.get(point_name(base, None, "probe"))
    if compute is not None:
        rates = {netns.rate_text(rate): link for (k, rate), (link, _) in links.items() if k == base}
        grids = tuple(
            c.grid for c in (CNN_DNN_2X2, CNN_DNN_4X4) if any(c.key == r["label"] for r in compute["compute"])
        )
        cluster_plots.scaling(curves(plan, compute, rates, grids), points, plan, figures / "scaling.png")
    crossovers = _crossovers(plan, store, points, links)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    flops = cluster_report.process_flops(store, plan)
    (figures / "table.md").write_text(cluster_plots.table_markdown(result, plan, flops, crossovers, date))
    result.notes.append(
        f"Figures and table.md: {figures.relative_to(REPO) if figures.is_relative_to(REPO) else figures}."
    )
    return result


def _crossovers(plan: Plan, store: Store, points: list, links: dict) -> dict[str, float | None]:
    """The model's crossover rate for each CNN-DNN on each K, from the epochs to the target and the aggregation
    phase measured unshaped, and the median α of that K's links."""
    found: dict[str, float | None] = {}
    for k in plan.nodes:
        compute = store.get(point_name(k, None, "probe"))
        alphas = sorted(link.alpha for (kk, _), (link, _) in links.items() if kk == k)
        unshaped = {p.config.key: p for p in points if p.nodes == k and p.rate is None and p.reached.epochs}
        if compute is None or not alphas:
            continue
        epochs = {key: p.reached.epochs for key, p in unshaped.items()}
        for config in configs(k):
            if config.is_global or config.key not in unshaped:
                continue
            aggregation = unshaped[config.key].data["records"][epochs[config.key] - 1]["aggregation_seconds"]
            found[f"K={k}, {config.label}"] = crossover_rate(
                config, plan, compute, alphas[len(alphas) // 2], k, epochs, aggregation
            )
    return found


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke test: few images, K = 2, unshaped and 100 Mbit/s")
    p.add_argument("--nodes", default="", help="comma-separated K to run instead of the plan's, e.g. 4")
    p.add_argument("--state", type=Path, default=None, help="folder of the finished measurements (resumable)")
    p.add_argument("--report", action="store_true", help="measure nothing: the result of what --state holds")
    p.add_argument("--out", type=Path, default=HERE, help="folder of results.json and results.md")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.report:
        reason = netns.requirements()
        if reason:
            print(reason, file=sys.stderr)
            return 2
    settings = Settings(quick=args.quick)
    plan = QUICK if args.quick else FULL
    if args.nodes:
        plan = dataclasses.replace(plan, nodes=tuple(int(k) for k in args.nodes.split(",")))
    import run as registry  # benchmarks/run.py: results.{json,md}

    start = time.perf_counter()
    try:
        result = run(settings, plan, args.state, measure=not args.report)
    except netns.Interrupted as stop:
        print(f"cluster benchmark {stop}; the namespaces are removed, finished measurements kept", file=sys.stderr)
        return 130
    result.seconds = time.perf_counter() - start
    print(registry.to_markdown(registry.record(result, settings, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
