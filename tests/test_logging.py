"""The global logging options (--quiet, --log-format json, --tensorboard) and where progress bars draw."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.engine import metrics
from sslcli.errors import UserError

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(autouse=True)
def default_settings() -> Iterator[None]:
    yield
    metrics.configure()  # the settings are process-wide: leave them as the next test expects


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """The log console writes to a buffer that rich treats as a terminal."""
    buffer = io.StringIO()
    monkeypatch.setattr(metrics, "console", Console(file=buffer, force_terminal=True, width=100))
    return buffer


@pytest.fixture
def run_with_metrics(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"epoch": 0, "step": s, "loss": 2.0 / s, "lr": 0.1} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_json_format_turns_every_log_line_and_the_error_into_one_object(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--log-format", "json", "plot", str(tmp_path / "nope")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["level"] == "error" and record["message"].startswith(f"'{tmp_path / 'nope'}' is not a directory")


def test_json_format_keeps_user_text_that_looks_like_markup(capsys: pytest.CaptureFixture[str]) -> None:
    metrics.configure(log_format="json")
    metrics.error("path '[bold]x' is odd")
    metrics.info("[bold]wrote[/] a.png")
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first == first | {"level": "error", "message": "path '[bold]x' is odd"}
    assert second["message"] == "wrote a.png"


def test_quiet_drops_info_and_keeps_warnings(run_with_metrics: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loud = CliRunner().invoke(app, ["plot", str(run_with_metrics)])
    quiet = CliRunner().invoke(app, ["--quiet", "plot", str(run_with_metrics)])
    assert loud.exit_code == quiet.exit_code == 0
    assert "wrote" in loud.output and quiet.output == ""
    metrics.configure(quiet=True)
    metrics.info("step 1")
    metrics.warn("embeddings look collapsed")
    assert capsys.readouterr().err.strip() == "warning: embeddings look collapsed"


def test_metrics_go_to_the_jsonl_always_and_to_the_log_stream_as_json(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    metrics.MetricsLog(tmp_path / "text.jsonl").write(step=1, loss=2.5)
    assert capsys.readouterr().err == ""  # text logs: the progress bar shows the numbers
    metrics.configure(log_format="json")
    metrics.MetricsLog(tmp_path / "json.jsonl").write(step=1, loss=2.5)
    echoed = json.loads(capsys.readouterr().err)
    for name in ("text.jsonl", "json.jsonl"):
        record = json.loads((tmp_path / name).read_text())
        assert record["step"] == 1 and record["loss"] == 2.5
    assert echoed == echoed | {"level": "info", "event": "metrics", "step": 1, "loss": 2.5}


def test_other_ranks_log_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, terminal: io.StringIO) -> None:
    monkeypatch.setattr(metrics.dist, "is_main", lambda: False)
    metrics.info("hello")
    metrics.warn("careful")
    metrics.MetricsLog(tmp_path / "m.jsonl").write(step=1, loss=1.0)
    assert list(metrics.track(range(3), 3, "work")) == [0, 1, 2]
    assert terminal.getvalue() == "" and not (tmp_path / "m.jsonl").exists()


def test_progress_bars_draw_on_a_terminal_only(terminal: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    assert metrics.progress_enabled()
    assert list(metrics.track(range(5), 5, "features")) == list(range(5))
    assert "features" in terminal.getvalue()
    for options in ({"quiet": True}, {"log_format": "json"}):
        metrics.configure(**options)
        assert not metrics.progress_enabled()
        terminal.truncate(0)
        assert list(metrics.track(range(5), 5, "features")) == list(range(5))
        assert terminal.getvalue() == ""
    metrics.configure()
    monkeypatch.setattr(metrics, "console", Console(file=io.StringIO()))  # a pipe or a file: no bar
    assert not metrics.progress_enabled()


def test_no_bar_inside_a_training_bar(terminal: io.StringIO) -> None:
    # rich draws one live display at a time; an extraction inside an epoch (DeepCluster) must not fail.
    with metrics.TrainProgress(total_steps=4, done_steps=0) as progress:
        assert progress.enabled and not metrics.progress_enabled()
        assert list(metrics.track(range(3), 3, "features")) == [0, 1, 2]
    assert metrics.progress_enabled()


@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed here")
def test_tensorboard_without_the_package_is_one_clear_error(run_with_metrics: Path) -> None:
    result = CliRunner().invoke(app, ["--tensorboard", "plot", str(run_with_metrics)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--tensorboard needs the tensorboard package" in " ".join(result.output.split())
    with pytest.raises(UserError, match="pip install tensorboard"):
        metrics.configure(tensorboard=True)


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="needs the optional tensorboard package")
def test_tensorboard_gets_every_number_as_a_scalar(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics.configure(tensorboard=True)
    log = metrics.MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2):
        log.write(epoch=0, step=step, loss=1.0 / step, lr=0.1)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "lr"}
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 0.5)]


def test_python_log_records_of_sslcli_follow_the_format(capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("sslcli.data.loader")
    logger.warning("skipped %d undecodable sample(s) of '%s'", 2, "shards/[a].tar")
    assert capsys.readouterr().err.strip() == "warning: skipped 2 undecodable sample(s) of 'shards/[a].tar'"
    metrics.configure(log_format="json", quiet=True)
    logger.warning("skipped %d", 3)
    record = json.loads(capsys.readouterr().err)
    assert record["level"] == "warning" and record["message"] == "skipped 3"


def test_shard_writing_shows_a_bar_on_a_terminal(terminal: io.StringIO, tmp_path: Path) -> None:
    from PIL import Image

    from sslcli.data.shards import folder_to_shards
    from sslcli.data.synth import generate_synthetic

    generate_synthetic(tmp_path / "synth", train=6, test=2, size=16)
    assert "rendering train (6 images)" in terminal.getvalue() and "rendering test (2 images)" in terminal.getvalue()
    (tmp_path / "folder").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(tmp_path / "folder" / f"{i}.png")
    terminal.truncate(0)
    folder_to_shards(tmp_path / "folder", tmp_path / "shards")
    assert "writing train shards" in terminal.getvalue()
