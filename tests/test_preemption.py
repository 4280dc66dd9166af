"""Checkpoints survive the process dying: kill -9 during a save leaves the previous checkpoint loadable and
nothing partial under a checkpoint name; retention keeps the newest N and the best; the preemption flag."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sslcli.engine import checkpoint
from sslcli.engine.preemption import PreemptionFlag

# Saves a 32 MB checkpoint as epoch 1.  "mid-write" stops once half the bytes are in the temporary file, "before-rename"
# once all are written and fsynced; each then says "ready" and waits to be killed.  "repeatedly" saves epochs
# 1, 2, ... for ever, saying "ready" after the first.
SAVER = r"""
import os, sys, time
from pathlib import Path
import torch
from sslcli.engine import checkpoint

directory, moment = Path(sys.argv[1]), sys.argv[2]
state = {"model": {"w": torch.randn(8_000_000)}, "epoch": 1}

def ready():
    print("ready", flush=True)

if moment == "mid-write":
    real_save = torch.save
    def half_save(obj, path):
        real_save(obj, path)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        ready()
        time.sleep(600)
    torch.save = half_save
elif moment == "before-rename":
    def stall(src, dst):
        ready()
        time.sleep(600)
    os.replace = stall
if moment == "repeatedly":
    epoch = 1
    while True:
        checkpoint.save_and_prune(state, directory, epoch, keep=3)
        if epoch == 1:
            ready()
        epoch += 1
else:
    checkpoint.save_and_prune(state, directory, 1, keep=1)
"""


def start_saver(directory: Path, moment: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(directory), moment], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("moment", ["mid-write", "before-rename"])
def test_kill_9_during_a_save_keeps_the_previous_checkpoint(moment: str, tmp_path: Path) -> None:
    previous = {"model": {"w": torch.arange(5.0)}, "epoch": 0}
    checkpoint.save_and_prune(previous, tmp_path, 0, keep=1)
    kill_9(start_saver(tmp_path, moment))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".epoch-0001.pt.tmp-")]
    assert len(leftovers) == 1  # the killed save's temporary file, never a checkpoint name
    assert checkpoint.list_checkpoints(tmp_path) == [tmp_path / "epoch-0000.pt"]
    path, state = checkpoint.latest_loadable(tmp_path)
    assert path.name == "epoch-0000.pt" and torch.equal(state["model"]["w"], previous["model"]["w"])
    checkpoint.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0000.pt"]


def test_kill_9_at_a_random_moment_of_repeated_saves_leaves_the_newest_checkpoint_loadable(tmp_path: Path) -> None:
    proc = start_saver(tmp_path, "repeatedly")
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))
    kill_9(proc)
    names = checkpoint.list_checkpoints(tmp_path)
    assert names, "the first save finished before 'ready'"
    path, state = checkpoint.latest_loadable(tmp_path)
    assert path == checkpoint.latest(tmp_path)  # the newest name is a whole checkpoint
    assert state["model"]["w"].numel() == 8_000_000
    for name in names:  # so is every other one kept
        checkpoint.load(name)


def test_retention_keeps_the_newest_and_the_best(tmp_path: Path) -> None:
    state = {"model": {}, "epoch": 0}
    for epoch, loss in enumerate([3.0, 1.0, 2.0, float("nan"), 5.0]):
        checkpoint.save_and_prune(state, tmp_path, epoch, keep=2, batch=2)  # a mid-epoch one first
        checkpoint.save_and_prune(state, tmp_path, epoch, keep=2, epoch_loss=loss)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["epoch-0001.pt", "epoch-0004-step-000002.pt", "epoch-0004.pt"]
    assert checkpoint.best(tmp_path) == tmp_path / "epoch-0001.pt"
    assert checkpoint.latest(tmp_path).name == "epoch-0004.pt"


def test_the_flag_catches_sigterm_and_sigusr1_and_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionFlag() as flag:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
