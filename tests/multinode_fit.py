"""Launching ``python -m videolavit fit`` the way a cluster does, on localhost CPUs with gloo: two torchrun
"nodes" of one process each (static rendezvous on a free port), one torchrun node of several processes, or a
plain single process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _fit_args(config: Path, nodes: int, devices: int, extra: tuple[str, ...]) -> list[str]:
    return ["-m", "videolavit", "fit", "--config", str(config), "--trainer.accelerator", "cpu",
            "--trainer.num_nodes", str(nodes), "--trainer.devices", str(devices), *extra]


def _failed(name: str, done: subprocess.CompletedProcess) -> str:
    return f"{name} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}"


def fit_on_two_nodes(config: Path, cwd: Path, *extra: str) -> None:
    """Two torchrun launches (``--nnodes 2 --nproc-per-node 1 --node-rank 0/1``), as two hosts would run them."""
    port = free_port()
    launches = []
    for node_rank in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
                   *_fit_args(config, 2, 1, extra)]
        launches.append(subprocess.Popen(command, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for launch in launches:
            stdout, stderr = launch.communicate(timeout=TIMEOUT_S)
            results.append(subprocess.CompletedProcess(launch.args, launch.returncode, stdout, stderr))
    finally:
        for launch in launches:
            if launch.poll() is None:
                launch.kill()
                launch.communicate()
    for node_rank, done in enumerate(results):
        assert done.returncode == 0, _failed(f"node {node_rank}", done)


def fit_on_one_node(config: Path, cwd: Path, processes: int, *extra: str) -> None:
    """``processes`` ranks on one host: torchrun ``--standalone`` for several, a plain process for one."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                     "--nproc-per-node", str(processes)]
    done = subprocess.run([*launcher, *_fit_args(config, 1, processes, extra)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, _failed(f"{processes} process(es)", done)
