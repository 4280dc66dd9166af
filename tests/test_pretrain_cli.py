"""`sslcli pretrain` and `sslcli export` as a user runs them, through Typer's CliRunner."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sslcli.cli.app import app

runner = CliRunner()
FAST = ["--recipe", "small", "--epochs", "1", "--batch-size", "64", "--num-workers", "0", "--device", "cpu"]


def invoke(*args: str):  # noqa: ANN201
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, needle: str) -> None:  # noqa: ANN001
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and needle in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 3  # one message (rich may wrap it)


@pytest.fixture(scope="module")
def finished_run(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "simclr"
    result = invoke("pretrain", "simclr", *FAST, "--data", synth_data, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_pretrain_writes_a_complete_run(finished_run: Path) -> None:
    assert (finished_run / "encoder.safetensors").exists()
    assert (finished_run / "checkpoints" / "epoch-0000.pt").exists()
    config = (finished_run / "config.yaml").read_text()
    assert "method: simclr" in config and "epochs: 1" in config


def test_finished_run_is_not_overwritten(finished_run: Path, synth_data: Path) -> None:
    before = (finished_run / "encoder.safetensors").read_bytes()
    result = invoke("pretrain", "simclr", *FAST, "--data", synth_data, "--out", finished_run)
    assert_user_error(result, "already holds a finished run")
    assert (finished_run / "encoder.safetensors").read_bytes() == before


def test_resume_continues_from_the_latest_checkpoint(finished_run: Path, synth_data: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(finished_run, run)
    result = invoke("pretrain", "simclr", *FAST[:2], "--epochs", "2", *FAST[4:], "--data", synth_data, "--out", run,
                    "--resume")
    assert result.exit_code == 0, result.output
    epochs = {json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert epochs == {0, 1}
    assert (run / "checkpoints" / "epoch-0001.pt").exists()


def test_export_round_trip_and_refusal(finished_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "enc.safetensors"
    result = invoke("export", finished_run, "--out", out)
    assert result.exit_code == 0, result.output
    assert "timm.create_model('resnet18'" in result.output
    assert_user_error(invoke("export", finished_run, "--out", out), "already exists")
    assert_user_error(invoke("export", tmp_path / "nope", "--out", tmp_path / "x.safetensors"), "does not exist")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["pretrain", "simclrr"], "unknown method 'simclrr' (did you mean: simclr"),
        (["pretrain", "simclr", "--data", "/no/such/dir"], "does not exist"),
        (["pretrain", "simclr", "--arch", "resnet81", "--data", "DATA"], "did you mean: resnet18"),
        (["pretrain", "simclr", "--set", "optim.lrr=1", "--data", "DATA"], "did you mean: optim.lr"),
        (["pretrain", "simclr", "--recipe", "tiny", "--data", "DATA"], "unknown recipe"),
        (["pretrain", "simclr", "--batch-size", "100000", "--data", "DATA"], "exceeds"),
        (["pretrain", "simclr", "--resume", "--data", "DATA"], "nothing to resume"),
        (["pretrain", "simclr", "--device", "cuda:7", "--data", "DATA"], "CUDA is not available"),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], needle: str, synth_data: Path, tmp_path: Path) -> None:
    args = [str(synth_data) if a == "DATA" else a for a in args]
    if args[:2] == ["pretrain", "simclr"] and "--recipe" not in args:
        args += ["--recipe", "small"]
    assert_user_error(invoke(*args, "--out", tmp_path / "run"), needle)
