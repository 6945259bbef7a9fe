"""One ``torchrun`` agent per emulated node (``netns.Cluster``), each starting one process of one thread: the
launch of the cluster benchmark's workers (``tta_worker.py``, ``cluster_probe.py``).

Each agent runs in its node's namespace with ``--nnodes=K --nproc-per-node=1`` and the c10d rendezvous at node 0's
address (``--rdzv-endpoint=10.213.0.1:29500``; node 0's agent hosts the store, ``--rdzv-conf=is_host=1``), with
``--local-addr`` its node's address. c10d numbers the nodes itself, in the order of the agents' addresses (so node
``i`` holds rank ``i``; ``--node-rank`` is only read by the static rendezvous, so it is not given; the probe checks
the order). ``GLOO_SOCKET_IFNAME`` keeps gloo on the node's link, ``OMP_NUM_THREADS=1`` (and ``--threads 1`` in the
training config) one thread per process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from netns import LINK, Cluster

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("cluster")
RENDEZVOUS_PORT = 29500


def environment() -> dict[str, str]:
    """The environment of every agent and worker: one thread, gloo on the node's link, ddcnn and the benchmarks
    importable, and c10d's warning about the namespaces' missing host names silenced."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": LINK,
        "TORCH_CPP_LOG_LEVEL": "ERROR",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")]),
    }


def agent_command(cluster: Cluster, node: int, run_id: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={cluster.k}",
        "--nproc-per-node=1",
        "--max-restarts=0",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={cluster.address(0)}:{RENDEZVOUS_PORT}",
        f"--rdzv-id={run_id}",
        f"--rdzv-conf=is_host={int(node == 0)}",
        f"--local-addr={cluster.address(node)}",
    ]


def torchrun(
    cluster: Cluster, script: str, spec: dict[str, Any], folder: Path, name: str, timeout: float = 3600
) -> float:
    """Run ``script SPEC.json`` (in ``benchmarks/``) on every node of ``cluster`` and wait for all of them; the wall
    seconds it took. Each node's output goes to ``folder/<name>-node<i>.log``; a failure raises with the end of the
    first failed node's log.

    The scripts touch ``<done>.<rank>`` once their measurement is complete on every rank (``spec["done"]``). A
    process that then dies while the process group is torn down (gloo aborts one now and then with "terminate called
    without an active exception" when its peers close their connections first, more often with more processes than
    cores) has measured everything: that is logged and not a failure, and the others are not waited for."""
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / f"{name}.done"
    for stale in folder.glob(f"{done.name}.*"):
        stale.unlink()
    spec = {**spec, "done": str(done)}
    spec_path = folder / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    run_id = f"ddcnn-{uuid.uuid4().hex[:8]}"
    env, processes, logs = environment(), [], []
    start = time.perf_counter()
    for node in range(cluster.k):
        log_path = folder / f"{name}-node{node}.log"
        logs.append(log_path)
        with log_path.open("w") as out:
            command = [*agent_command(cluster, node, run_id), str(REPO / "benchmarks" / script), str(spec_path)]
            processes.append(cluster.popen(node, command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO)))

    def complete() -> bool:
        return all(Path(f"{done}.{rank}").exists() for rank in range(cluster.k))

    codes = cluster.wait_all(processes, timeout, complete)
    seconds = time.perf_counter() - start
    for process in processes:
        cluster.processes.remove(process)
    failed = [i for i, code in enumerate(codes) if code != 0]
    if failed and complete():
        log.warning(
            "%s: node %d failed after its measurement was complete (exit statuses %s); kept", name, failed[0], codes
        )
    elif failed:
        tail = logs[failed[0]].read_text()[-3000:]
        raise RuntimeError(f"{script} ({name}) failed on node {failed[0]} (exit statuses {codes}):\n{tail}")
    return seconds
