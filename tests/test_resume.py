"""Sample-exact resume: a run stopped after step k (by an exception, or by SIGTERM through the real CLI) and
resumed ends with exactly the weights, buffers and optimiser state of a run that was never stopped.

MAE draws its masks from torch's global generator during training, so the comparison also checks that every
rank's generator states travel in the checkpoint; the data position is checked by the loader resuming at
the checkpoint's batch (a wrong batch or augmentation changes the weights)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.config import CropOptions, build_config
from sslcli.engine import checkpoint
from sslcli.engine.preemption import PREEMPTED_EXIT_CODE
from sslcli.errors import UserError
from sslcli.pretrain import pretrain

from faults import crash_at_step

# 64 images, batch 16: 4 steps an epoch, 12 in all; 32-px crops, 16 patches.
OPTIONS = {"arch": "vit_tiny_p8", "epochs": 3, "batch_size": 16, "num_workers": 0, "log_every": 1}
CROPS = CropOptions(global_size=32)
CLI = ["--recipe", "small", "--arch", "vit_tiny_p8", "--epochs", "3", "--batch-size", "16", "--num-workers", "0",
       "--global-size", "32", "--device", "cpu", "--set", "log_every=1"]


# One intra-op thread here and in the CLI subprocess: the thread count changes float summation order, so runs
# compare bit for bit only at equal counts.
pytestmark = pytest.mark.usefixtures("single_thread")


def config(data: Path, **extra: Any):  # noqa: ANN201
    return build_config("mae", "small", {**OPTIONS, "data": str(data), **extra}, crops=CROPS)


def final_state(run: Path) -> dict[str, Any]:
    return checkpoint.load(checkpoint.latest(run / "checkpoints"))


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Bit-identical nested tensors / numbers (the optimiser state is nested dicts and lists)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs (max |diff| {(a.float() - b.float()).abs().max().item():.3g})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_training(run: Path, reference: Path) -> None:
    ours, theirs = final_state(run), final_state(reference)
    for key in ("model", "optimizer", "scaler"):
        assert_identical(ours[key], theirs[key], key)


def sigterm_after_two_steps(proc: subprocess.Popen, metrics: Path) -> str:
    """Sends SIGTERM once the run has logged two steps; its output."""
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and proc.poll() is None:
        assert time.monotonic() < deadline, "the run logged no step in 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=120)[0]


@pytest.fixture(scope="module")
def uninterrupted(single_thread: None, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pretrain(config(tiny_data), tmp_path_factory.mktemp("runs") / "straight", device="cpu")


def test_crash_mid_epoch_then_resume_is_bit_identical(uninterrupted: Path, tiny_data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    crash_at_step(monkeypatch, 7)
    run = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(config(tiny_data, checkpoint_every=5), run, device="cpu")
    # Step 5 is batch 1 of epoch 1: the newest checkpoint is mid-epoch, after the epoch-0 one.
    assert checkpoint.latest(run / "checkpoints").name == "epoch-0001-step-000001.pt"
    assert json.loads((run / "run.json").read_text()) == {"status": "failed", "epochs": 3,
                                                          "error": "RuntimeError: simulated crash in step 7"}
    monkeypatch.undo()
    pretrain(config(tiny_data), run, device="cpu", resume=True)
    assert_same_training(run, uninterrupted)
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # the lost step 6 is logged once, by the resumed run


def test_sigterm_through_the_cli_checkpoints_exits_75_and_resumes_exactly(uninterrupted: Path, tiny_data: Path,
                                                                           tmp_path: Path) -> None:
    run = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "sslcli", "pretrain", "mae", *CLI, "--data", str(tiny_data), "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = run / "metrics.jsonl"
    output = sigterm_after_two_steps(proc, metrics)
    assert proc.returncode == PREEMPTED_EXIT_CODE, output
    assert "stopped by SIGTERM" in output and "--resume auto" in output
    stopped_at = len(metrics.read_text().splitlines())
    assert 2 <= stopped_at < 12, output
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "preempted" and status["signal"] == "SIGTERM", status
    assert Path(status["checkpoint"]).is_file() and Path(status["checkpoint"]).parent == run / "checkpoints"
    result = CliRunner().invoke(app, ["pretrain", "mae", *CLI, "--data", str(tiny_data), "--out", str(run),
                                      "--resume", "auto"])
    assert result.exit_code == 0, result.output
    assert f"batch {stopped_at % 4} of 4" in result.output
    assert "lr: base 0.0015 per 256 x global batch 16 (1 process(es) x 16) -> 9.38e-05 (linear scaling)" in result.output
    assert_same_training(run, uninterrupted)
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_two_ranks_stopped_through_torchrun_resume_exactly(tiny_data: Path, tmp_path: Path) -> None:
    """SIGTERM to torchrun reaches both gloo ranks, which agree on the step, checkpoint and exit; the resumed
    2-rank run ends where an uninterrupted 2-rank run does (torchrun itself reports the signal as a failure)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sslcli",
              "pretrain", "mae", *CLI, "--data", str(tiny_data)]
    subprocess.run([*launch, "--out", str(tmp_path / "straight")], env=env, check=True, capture_output=True, timeout=300)
    run = tmp_path / "preempted"
    proc = subprocess.Popen([*launch, "--out", str(run)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = run / "metrics.jsonl"
    output = sigterm_after_two_steps(proc, metrics)
    assert "stopped by SIGTERM" in output and len(metrics.read_text().splitlines()) < 12, output
    subprocess.run([*launch, "--out", str(run), "--resume", "auto"], env=env, check=True, capture_output=True,
                   timeout=300)
    assert_same_training(run, tmp_path / "straight")


def test_resume_auto_starts_fresh_without_a_checkpoint_and_refuses_a_corrupt_one(tiny_data: Path,
                                                                               tmp_path: Path) -> None:
    run = tmp_path / "auto"
    run.mkdir()
    (run / "run.json").write_text('{"status": "running"}')  # a job stopped before its first checkpoint
    cfg = config(tiny_data, epochs=1)
    pretrain(cfg, run, device="cpu", resume="auto")
    assert checkpoint.latest(run / "checkpoints").name == "epoch-0000.pt"
    for path in checkpoint.list_checkpoints(run / "checkpoints"):
        path.write_bytes(b"truncated")
    with pytest.raises(UserError, match="no checkpoint in .* loads"):
        pretrain(cfg, run, device="cpu", resume="auto")


def test_resume_refuses_another_method_or_shape(uninterrupted: Path, tiny_data: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    with pytest.raises(UserError, match=r"is mae/vit_tiny_p8 but this run is mae/vit_tiny_p4"):
        pretrain(config(tiny_data, arch="vit_tiny_p4"), run, device="cpu", resume=True)
    other = build_config("mae", "small", {**OPTIONS, "data": str(tiny_data)}, ["method_args.decoder_dim=64"], CROPS)
    with pytest.raises(UserError, match=r"holds '.*' of shape .* needs"):
        pretrain(other, run, device="cpu", resume=True)


def test_a_checkpoint_with_pickled_objects_is_refused_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (open, (str(marker), "w"))  # what a malicious checkpoint would run on load

    path = tmp_path / "checkpoints" / "epoch-0000.pt"
    path.parent.mkdir()
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Payload()}, path)
    with pytest.raises(UserError, match=r"holds pickled Python objects \(io.open\).*never code"):
        checkpoint.load(path)
    assert not marker.exists()
    assert checkpoint.latest_loadable(path.parent) is None


@pytest.mark.parametrize(("args", "needle"), [
    (["--accum-steps", "3"], "--accum-steps 3 must divide the per-process batch 16"),
    (["--max-bad-fraction", "1.5"], "--max-bad-fraction (max_bad_fraction) must be in [0, 1], got 1.5"),
    (["--checkpoint-every", "-1"], "--checkpoint-every (checkpoint_every) must be 0 (epoch ends only) or more, got -1"),
    (["--precision", "fp8"], "config key 'precision' must be one of ['auto', 'bf16', 'fp16', 'fp32']"),
    (["auto"], "unexpected argument 'auto'; the only word after the method is 'auto', as in --resume auto"),
    (["--resume"], "nothing to resume"),
])
def test_bad_loop_options_are_one_line_errors(args: list[str], needle: str, tiny_data: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["pretrain", "mae", *CLI, "--data", str(tiny_data), "--out", str(tmp_path / "r"),
                                      *args])
    assert result.exit_code == 2 and needle in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()
