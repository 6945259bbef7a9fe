"""Multi-node torchrun, as docs/distributed.md gives it: two torchrun agents on this machine play two nodes of one
process each (gloo on the CPU, one thread each, everything on 127.0.0.1), and their runs are compared with the
1-process run of the same config (a data-parallel run, through DDP, with the same 2 processes on one node); then a node is lost in the middle of a run, and the job must end in bounded time
with ddcnn's one-line error, and ``--resume`` on two nodes must finish it as if nothing had happened.

*Two nodes on one machine.* Real nodes differ in their host names, and that settles two things that two agents on
one host must be told: which agent hosts the c10d rendezvous store (the one on the endpoint's host, here
``--rdzv-conf=is_host=1``) and the order of the nodes (c10d numbers them in the order of their addresses, then of
their agents' process ids, whatever ``--node-rank`` says; here ``--local-addr`` 127.0.0.1 sorts before localhost), so
node 0 is always the one that hosts the store and holds rank 0. ``GLOO_SOCKET_IFNAME=lo`` keeps gloo on the
loopback interface.

*Tolerance.* A 1-process and a 2-process run differ only in the order of floating-point sums (grouped convolutions
of fewer groups per process). In float32 that difference grows to ~3e-4 relative within two epochs on some CPUs
(AVX-512; ~1e-5 on others): a ~1e3-1e4-fold amplification of float32's eps of 1e-7. So these runs train in float64
(``train.dtype``), whose eps of 1e-16 the same amplification takes to ~1e-12, and compare with rtol=1e-8,
atol=1e-10 (measured: at most 3e-12 relative, element by element): four orders of magnitude of margin on any
CPU, while a real difference (a wrong gradient, a lost or repeated batch) shows at 1e-3 or more. Integers (test
accuracy on 30 images, parameter counts, bytes sent) compare exactly.

*Node loss, by construction.* The lost node's worker (rank 1) runs ddcnn's CLI with a callback that makes it block
forever at the end of epoch 1 (checkpoint written, log row written): a marker file says so, and only then does
the test SIGKILL that node's torchrun agent and worker. Node 0 is then in epoch 2, in or on its way to a collective
it cannot finish, so the run cannot end before the kill, however fast the machine.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import ddcnn
from ddcnn.config import DataConfig, ModelConfig, RunConfig, TrainConfig, config_to_dict
from ddcnn.train import load_checkpoint

from conftest import one_phase_results

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not sys.platform.startswith("linux") or "lo" not in {name for _, name in socket.if_nameindex()},
        reason="needs Linux (/proc, process groups) and its loopback interface lo",
    ),
]

DTYPE = "float64"  # see the module docstring: float64 makes the 1-process comparison independent of the CPU
RTOL, ATOL = 1e-8, 1e-10
SRC = str(Path(ddcnn.__file__).parents[1])
RUN_TIMEOUT = 180.0  # seconds: a whole two-node run of the tiny configs (about 10 s on 2 loaded cores)
LOSS_DETECTED_WITHIN = 60.0  # seconds from the kill to the end of node 0's torchrun


# -- helpers ------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
        **extra,
    }


def write_config(cfg: RunConfig) -> Path:
    config = Path(cfg.out) / "run.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return config


def results(cfg: RunConfig) -> dict[str, Any]:
    return one_phase_results(Path(cfg.out))


def train_on_one_node(cfg: RunConfig, processes: int = 1) -> dict[str, Any]:
    """``ddcnn train`` of ``cfg`` under plain ``python`` (``processes`` > 1: under torchrun, on this one node), one
    thread each; its results.json."""
    launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={processes}", f"--master-port={_free_port()}"]
    program = ["-m", "ddcnn", "train", "--config", str(write_config(cfg))]
    command = [sys.executable, *(launcher if processes > 1 else []), *program]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return results(cfg)


def torchrun_command(node_rank: int, rendezvous: str, port: int, rdzv_id: str) -> list[str]:
    """One node's torchrun (of two nodes of one process each), up to the program to run.

    ``c10d``: the command of docs/distributed.md, plus what two agents on one host need (module docstring).
    ``static``: the fixed node order of docs/distributed.md, ``--node-rank`` and the master's address."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--max-restarts=0"]
    if rendezvous == "c10d":
        return [
            *command, "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}",
            f"--rdzv-conf=is_host={int(node_rank == 0)}", f"--local-addr={('127.0.0.1', 'localhost')[node_rank]}",
        ]
    assert rendezvous == "static", rendezvous
    return [*command, f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}"]


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path("/proc", entry, "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # pid (comm) state ppid ...
            children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    children, found, todo = _children(), [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_tree(agent: subprocess.Popen) -> None:
    """SIGKILL a torchrun agent (started in a session of its own) and everything under it: its workers are in
    sessions of their own (torchrun starts them so), so each group our processes lead is killed, as a lost node
    would lose them."""
    if agent.poll() is not None:
        return  # torchrun stops its workers before it exits
    pids = [agent.pid, *descendants(agent.pid)]
    for pid in pids:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait(timeout=30)


@dataclasses.dataclass
class Nodes:
    """The torchrun agents a test started, each with its output in a log file; all killed at teardown."""

    folder: Path
    agents: list[subprocess.Popen] = dataclasses.field(default_factory=list)

    def start(
        self, node_rank: int, launcher: list[str], program: list[str], name: str, env: dict[str, str]
    ) -> subprocess.Popen:
        log = (self.folder / f"{name}-node{node_rank}.log").open("w")
        with log:
            agent = subprocess.Popen(
                [*launcher, *program], env=_env(**env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        agent.log = Path(log.name)  # type: ignore[attr-defined]
        self.agents.append(agent)
        return agent

    def run(
        self, cfg: RunConfig, rendezvous: str = "c10d", program: Callable[[Path], list[str]] | None = None,
        name: str = "run", env: dict[str, str] | None = None,
    ) -> list[subprocess.Popen]:
        """Start ``cfg`` on two nodes (``program(config)``: what each node's torchrun runs, by default ``-m ddcnn
        train --config``; logs ``<name>-node<r>.log``); returns the two agents, node 0 first."""
        config = write_config(cfg)
        port, rdzv_id = _free_port(), f"ddcnn-test-{uuid.uuid4().hex[:8]}"
        program = program or (lambda config: ["-m", "ddcnn", "train", "--config", str(config)])
        return [
            self.start(r, torchrun_command(r, rendezvous, port, rdzv_id), program(config), name, env or {})
            for r in (0, 1)
        ]

    def train(self, cfg: RunConfig, rendezvous: str = "c10d", name: str = "run") -> dict[str, Any]:
        """``ddcnn train`` of ``cfg`` on two nodes, to the end; its results.json."""
        agents = self.run(cfg, rendezvous, name=name)
        deadline = time.monotonic() + RUN_TIMEOUT
        for agent in agents:
            try:
                agent.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the two-node run took over {RUN_TIMEOUT:.0f} s\n{self.tails()}")
        assert [a.returncode for a in agents] == [0, 0], self.tails()
        return results(cfg)

    def tails(self) -> str:
        return "\n".join(f"== {a.log.name}:\n{a.log.read_text()[-3000:]}" for a in self.agents)


@pytest.fixture
def nodes(tmp_path) -> Iterator[Nodes]:
    started = Nodes(tmp_path)
    try:
        yield started
    finally:
        for agent in started.agents:
            kill_tree(agent)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, nodes: Nodes) -> None:
    """Poll ``condition`` every 50 ms; fail after ``timeout`` seconds, or as soon as an agent has ended."""
    deadline = time.monotonic() + timeout
    while not condition():
        ended = [a for a in nodes.agents if a.poll() is not None]
        if ended or time.monotonic() > deadline:
            reason = f"{ended[0].log.name} ended" if ended else f"{timeout:.0f} s passed"
            pytest.fail(f"{reason} before {what}\n{nodes.tails()}")
        time.sleep(0.05)


# -- comparing with the 1-process run ------------------------------------------------------------------------------


def assert_same_run(run: dict[str, Any], reference: dict[str, Any], checkpoint: str) -> None:
    """Same test accuracy and parameters, same logged numbers and the same checkpoint (model and optimizer state),
    within float64 rounding (the module docstring)."""
    (row,), (expected,) = run["rows"], reference["rows"]
    assert row["test_accuracy"] == expected["test_accuracy"] and row["val_accuracy"] == expected["val_accuracy"]
    assert row["parameters"] == expected["parameters"]
    for logged, wanted in zip(run["history"], reference["history"], strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "train_subdomain_accuracy"):
            if key in wanted:
                assert logged[key] == pytest.approx(wanted[key], rel=RTOL, abs=ATOL), key
    state, expected_state = (load_checkpoint(Path(r["config"]["out"]) / checkpoint) for r in (run, reference))
    assert state["finished"] and state["epoch"] == expected_state["epoch"]
    assert state["model"].keys() == expected_state["model"].keys()
    assert {v.dtype for v in state["model"].values() if v.is_floating_point()} == {torch.float64}  # really float64
    torch.testing.assert_close(state["model"], expected_state["model"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(state["optimizer"]["state"], expected_state["optimizer"]["state"], rtol=RTOL, atol=ATOL)


def _tiny_local(out: Path, data: DataConfig, epochs: int = 2, **train: Any) -> RunConfig:
    """The local phase on a 2x2 grid, constant learning rate (so that a run resumed after epoch 1 is the same)."""
    return RunConfig(
        method="local", out=str(out), data=data, model=ModelConfig(backbone="vgg3", width=0.25, grid=(2, 2)),
        train=TrainConfig(
            epochs=epochs, schedule="constant", lr=0.02, progress=False, device="cpu", threads=1, dtype=DTYPE,
            **train,
        ),
    )


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, tiny_data_config) -> dict[str, Any]:
    """The 1-process local phase of 2 epochs."""
    return train_on_one_node(_tiny_local(tmp_path_factory.mktemp("local1"), tiny_data_config))


# -- the tests --------------------------------------------------------------------------------------------------


def test_local_phase_on_two_nodes_is_the_one_process_run(tmp_path, tiny_data_config, local_reference, nodes):
    """c10d rendezvous, the command of docs/distributed.md."""
    run = nodes.train(_tiny_local(tmp_path / "run", tiny_data_config))
    assert_same_run(run, local_reference, "local.pt")
    assert [row["comm_bytes_per_step"] for row in run["history"]] == [0, 0]  # the local phase: no communication
    assert (tmp_path / "run" / "train.log").read_text().count("local epoch 2/2") == 1  # logged once, by rank 0


def test_coherent_training_on_two_nodes_is_the_one_process_run(tmp_path, tiny_run, nodes):
    """Static rendezvous (--node-rank, --master-addr, --master-port), the other form docs/distributed.md gives."""
    options = {"method": "coherent", "train__device": "cpu", "train__threads": 1, "train__dtype": DTYPE}
    reference = train_on_one_node(tiny_run(tmp_path / "one", **options))
    run = nodes.train(tiny_run(tmp_path / "two", **options), rendezvous="static")
    assert_same_run(run, reference, "coherent.pt")
    batch, subdomains, classes = run["config"]["data"]["batch_size"], 4, 3
    # B*N*K float64 probabilities forward, nothing back
    assert run["history"][0]["comm_bytes_per_step"] == batch * subdomains * classes * 8
    assert reference["history"][0]["comm_bytes_per_step"] == 0


def test_data_parallel_global_cnn_on_two_nodes_is_the_two_process_run(tmp_path, tiny_run, nodes):
    """DDP between nodes: the global CNN with --parallel data on two nodes of one process each gives the numbers of
    the same two processes on one node (the same shares of every batch, the same sums: a 2-rank all-reduce adds
    the same two numbers), and all-reduces every parameter at every step."""
    options = {"method": "global", "model__grid": (1, 1), "train__device": "cpu", "train__threads": 1,
               "train__dtype": DTYPE, "train__parallel": "data"}
    reference = train_on_one_node(tiny_run(tmp_path / "one", **options), processes=2)
    run = nodes.train(tiny_run(tmp_path / "two", **options))
    assert_same_run(run, reference, "global.pt")
    (row,) = run["rows"]
    assert run["history"][0]["comm_bytes_per_step"] == row["data_parallel_bytes_per_step"] == row["parameters"] * 8


# ddcnn's command line with a callback (ddcnn.train.callbacks) that makes rank 1 block forever at the end of epoch 1
# (trained, validated, checkpointed and logged), once it has written its pid to the file $DDCNN_TEST_HANGING.
HANG_AFTER_EPOCH_1 = '''
import os, sys, threading
from pathlib import Path

from ddcnn import cli
from ddcnn.train.callbacks import Callback


class HangAfterEpoch1(Callback):
    def on_epoch_end(self, trainer, row):
        if os.environ["RANK"] == "1" and row["epoch"] == 1:
            marker = Path(os.environ["DDCNN_TEST_HANGING"])
            marker.with_suffix(".tmp").write_text(str(os.getpid()))
            marker.with_suffix(".tmp").rename(marker)
            threading.Event().wait()


sys.exit(cli.main(sys.argv[1:], callbacks=[HangAfterEpoch1()]))
'''


def test_a_lost_node_ends_the_job_and_resume_finishes_it(tmp_path, tiny_data_config, local_reference, nodes):
    """Node 1 (rank 1) is lost during epoch 2 of 2: node 0's torchrun ends within a minute, non-zero, with ddcnn's
    one-line error saying to resume; ``--resume`` on two nodes then gives the uninterrupted 1-process run."""
    cfg = _tiny_local(tmp_path / "run", tiny_data_config, dist_timeout=0.5)  # a hang, too, would end in 30 s
    launcher, hanging = tmp_path / "hang_after_epoch_1.py", tmp_path / "rank1.hanging"
    launcher.write_text(HANG_AFTER_EPOCH_1)
    node0, node1 = nodes.run(
        cfg, program=lambda config: [str(launcher), "train", "--config", str(config)],
        env={"DDCNN_TEST_HANGING": str(hanging)},
    )
    wait_for(hanging.exists, RUN_TIMEOUT, "rank 1 finished epoch 1", nodes)
    assert int(hanging.read_text()) in descendants(node1.pid), "rank 1 should run on node 1 (c10d's node order)"
    checkpoint = Path(cfg.out) / "local.pt"
    assert load_checkpoint(checkpoint)["epoch"] == 1 and not load_checkpoint(checkpoint)["finished"]

    kill_tree(node1)  # the node is lost: its agent and its worker
    killed = time.monotonic()
    try:
        node0.wait(timeout=LOSS_DETECTED_WITHIN)
    except subprocess.TimeoutExpired:
        pytest.fail(f"node 0 still runs {LOSS_DETECTED_WITHIN:.0f} s after node 1 was lost\n{nodes.tails()}")
    detected = time.monotonic() - killed
    output = node0.log.read_text()
    errors = [line for line in output.splitlines() if line.startswith("ddcnn: error:")]
    assert node0.returncode != 0 and len(errors) == 1, output[-4000:]
    assert "rank 0 lost contact with the other processes" in errors[0], errors[0]
    assert "another process probably died or hung" in errors[0] and "--resume" in errors[0], errors[0]
    assert load_checkpoint(checkpoint)["epoch"] == 1  # epoch 2 could not be checkpointed without rank 1
    print(f"node 0's torchrun ended {detected:.1f} s after node 1 was lost: {errors[0]}")

    resumed = nodes.train(dataclasses.replace(cfg, resume=True), name="resume")
    assert_same_run(resumed, local_reference, "local.pt")
    log = (Path(cfg.out) / "train.log").read_text()
    assert "resumed local from" in log and log.count("local epoch 2/2") == 1
