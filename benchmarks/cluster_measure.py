"""The measurements of the cluster benchmark on one emulated cluster of K nodes: the links' rate as shaped, the
α-β sweep and the compute probe (``cluster_probe.py``), and the training of every configuration at every rate
(``tta_worker.py``), each saved in the :class:`~cluster_plan.Store` as soon as it is done and skipped when it is
there already."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import bench_time_to_accuracy as tta
from cluster_launch import torchrun
from cluster_plan import BACKBONE, CNN_DNN_4X4, WIDTH, Config, Plan, Store, configs, rate_key
from netns import LINK, Cluster, rate_text

from ddcnn.config import config_to_dict

log = logging.getLogger("cluster")

UNSHAPED_BYTES_PER_SECOND = 2.5e9  # a guess of the veth pair's speed, only to size the sweep


def sweep_sizes(rate_bps: float | None, nodes: int) -> list[int]:
    """The all-reduce sizes of the α-β sweep: from 4 bytes up to 4 MiB (4x the gradients of one step), or what
    takes about a second at the rate."""
    ring = 2 * (nodes - 1) / nodes
    bandwidth = rate_bps / 8 if rate_bps else UNSHAPED_BYTES_PER_SECOND
    largest = min(4 << 20, max(256 << 10, int(1.0 * bandwidth / ring)))
    return [n for n in (4, 1 << 10, 8 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20) if n <= largest]


def point_name(nodes: int, rate: float | None, what: str) -> str:
    return f"K{nodes}-{rate_key(rate)}-{what}"


def measure_cluster(cluster: Cluster, plan: Plan, store: Store, logs: Path) -> None:
    """Everything of ``plan`` on ``cluster``'s K nodes: per rate the shaping check, the probe (the α-β sweep and the
    compute), then each configuration; what ``store`` has already is skipped."""
    k = cluster.k
    for rate in plan.rates:
        cluster.shape(rate)
        name = point_name(k, rate, "link")
        if store.get(name) is None:
            measured = cluster.measure_rate(1.0)
            store.put(name, {"rate_bps": rate, "measured_bps": measured})
            log.info("K=%d %s: one TCP stream measured %.4g Mbit/s", k, rate_text(rate), measured / 1e6)
        name = point_name(k, rate, "probe")
        if store.get(name) is None:
            spec = {
                "sizes": sweep_sizes(rate, k),
                "models": _probe_models(plan, k),
                "powersgd_rank": plan.powersgd_rank,
            }
            store.put(name, _probe(cluster, spec, logs, name))
        for config in configs(k):
            name = point_name(k, rate, config.key)
            if store.get(name) is None:
                store.put(name, train_point(cluster, plan, config, rate, logs, name))


def _probe_models(plan: Plan, nodes: int) -> list[dict[str, Any]]:
    """The compute probe's models: the global CNN on its process's share of a batch under each hook, each
    CNN-DNN's local CNNs of one process on whole batches (on 2 nodes the 4x4 one too, for the scaling model)."""
    chosen = configs(nodes) + ((CNN_DNN_4X4,) if CNN_DNN_4X4 not in configs(nodes) else ())
    return [
        {
            "label": c.key,
            "grid": list(c.grid),
            "batch": plan.batch // nodes if c.is_global else plan.batch,
            "hook": c.hook,
            "width": WIDTH,
        }
        for c in chosen
    ]


def _probe(cluster: Cluster, spec: dict[str, Any], logs: Path, name: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ddcnn-cluster-") as tmp:
        output = Path(tmp) / "probe.json"
        seconds = torchrun(cluster, "cluster_probe.py", {**spec, "output": str(output)}, logs, name, timeout=900)
        result = json.loads(output.read_text())
    expected = [cluster.address(i) for i in range(cluster.k)]
    if result["addresses"] != expected:
        raise RuntimeError(f"ranks are not on their nodes: rank i ran at {result['addresses']}, expected {expected}")
    return {**result, "wall_seconds": seconds}


def run_config(plan: Plan, config: Config, nodes: int, out: Path):
    """The ddcnn configuration of ``config``: that of the time-to-accuracy benchmark (CIFAR-10 augmented, ddcnn's
    default optimiser, schedule and batch), one thread per process, DDP with ``config.hook`` for the global CNN,
    model parallelism for the CNN-DNN."""
    candidate = tta.Candidate(config.label, config.grid, nodes, 1, "data" if config.is_global else "model")
    tta_plan = tta.Plan(plan.train_images, plan.epochs, plan.target, plan.aggregator_epochs)
    cfg = tta.run_config(candidate, tta_plan, out)
    cfg.model = dataclasses.replace(cfg.model, backbone=BACKBONE, width=WIDTH)
    cfg.data = dataclasses.replace(cfg.data, batch_size=plan.batch)
    if config.is_global:
        if not hasattr(cfg.train, "ddp_hook"):
            if config.hook != "none":
                raise RuntimeError(f"this ddcnn has no --ddp-hook: cannot measure {config.label}")
        else:
            cfg.train = dataclasses.replace(cfg.train, ddp_hook=config.hook, powersgd_rank=plan.powersgd_rank)
    return cfg


def train_point(
    cluster: Cluster, plan: Plan, config: Config, rate: float | None, logs: Path, name: str
) -> dict[str, Any]:
    """Train ``config`` on ``cluster`` at ``rate``: to the target (end to end) or its first epochs (composed)."""
    k = cluster.k
    end_to_end = plan.is_end_to_end(k, rate)
    log.info(
        "K=%d %s %s: %s",
        k,
        rate_text(rate),
        config.label,
        "to the target" if end_to_end else f"{plan.measure_epochs(config)} epoch(s)",
    )
    before = cluster.qdisc_stats()
    folder = Path(tempfile.mkdtemp(prefix="ddcnn-cluster-"))
    try:
        spec = {
            "config": config_to_dict(run_config(plan, config, k, folder / "run")),
            "target": plan.target,
            "records": str(folder / "records.json"),
            "test_images": plan.test_images,
            "max_epochs": None if end_to_end else plan.measure_epochs(config),
            "interface": LINK,
        }
        seconds = torchrun(cluster, "tta_worker.py", spec, logs, name, timeout=4 * 3600)
        output = json.loads((folder / "records.json").read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    after = cluster.qdisc_stats()
    qdisc = {dev: {k2: after[dev][k2] - before.get(dev, {}).get(k2, 0) for k2 in after[dev]} for dev in after}
    last = output["records"][-1]
    log.info(
        "  %d epoch(s), %.1f s training, test accuracy %.3f (%.0f s in all)",
        last["epoch"],
        last["seconds"],
        last["test_accuracy"],
        seconds,
    )
    return {**output, "end_to_end": end_to_end, "wall_seconds": seconds, "qdisc": qdisc, "rate_bps": rate}
