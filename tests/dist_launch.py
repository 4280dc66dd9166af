"""Launching the scripts in tests/dist/: once as a plain process (1 rank x B) and once under torchrun
(N real gloo ranks x B/N); the tests then compare what the two saved."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent / "dist"

def _env() -> dict[str, str]:
    # Read at launch, not import, so fixtures' variables (SSLCLI_CACHE) reach the processes; one
    # thread per process, since two ranks on a 2-core machine would otherwise oversubscribe it.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def run_single(script: str, *args: str) -> None:
    """``tests/dist/<script> args...`` in one plain process (world size 1)."""
    _run([sys.executable, str(SCRIPTS / script), *args])


def torchrun(script: str, *args: str, nproc: int = 2) -> None:
    """``tests/dist/<script> args...`` on ``nproc`` gloo ranks (torchrun --standalone)."""
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
          str(SCRIPTS / script), *args])


def torchrun_nodes(script: str, *args: str, nodes: int = 2) -> None:
    """``tests/dist/<script> args...`` as ``nodes`` one-process "nodes" on this host: one torchrun per node
    meeting at a c10d rendezvous, the way a multi-node SLURM job launches (recipes/slurm/multi_node.sbatch)."""
    with socket.socket() as probe:  # a free port for the rendezvous store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc_per_node=1",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=test-{port}",
           str(SCRIPTS / script), *args]
    launchers = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(nodes)]
    outputs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    for launcher, output in zip(launchers, outputs):
        assert launcher.returncode == 0, output[-3000:]
