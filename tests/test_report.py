"""`sslcli report`: results files (or the directories holding them) -> one table with exactly their values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.evaluation import EncoderInfo
from sslcli.evaluation.report import build_report, to_markdown
from sslcli.evaluation.results import write_results

runner = CliRunner()
EXPECTED = """\
| encoder | knn top1 | linear-probe top1 | finetune-10% top1 | finetune-10% best.top1 |
|---|---:|---:|---:|---:|
| runs/simclr | 61.23% | - | 75.00% | 77.12% |
| resnet18, random init (seed 0) | - | 12.34% | - | - |
"""


def _info(name: str, kind: str, run_dir: str | None) -> EncoderInfo:
    return EncoderInfo(name=name, kind=kind, arch="resnet18", image_size=32, mean=(0.5,) * 3,  # type: ignore[arg-type]
                       std=(0.25,) * 3, crop_pct=1.0, run_dir=run_dir, metadata={"method": "simclr"})


@pytest.fixture
def results(tmp_path: Path) -> dict[str, Path]:
    """A run's kNN, a fine-tune of the same run (in its own output directory) and a random-init linear probe."""
    run = _info("runs/simclr (simclr, 3 epochs)", "weights", "runs/simclr")
    knn = write_results(tmp_path / "runs" / "results" / "knn.json", command="knn", encoder=run, data={},
                        params={"seed": 0}, metrics={"top1": 0.6123, "top5": 0.9, "per_k": {"20": {"top1": 0.6123}}})
    finetuned = write_results(tmp_path / "ft" / "results.json", command="finetune", protocol="finetune-10%",
                              encoder={**run.__dict__, "run_dir": "runs/simclr/"}, data={}, params={},
                              metrics={"top1": 0.75, "top5": 0.95, "best": {"epoch": 3, "top1": 0.7712},
                                       "validation": [{"epoch": 3, "top1": 0.5}]})
    probe = write_results(tmp_path / "probe.json", command="linear-probe", data={}, params={"seed": 0},
                          encoder=_info("resnet18, random init (seed 0)", "random_init", None),
                          metrics={"top1": 0.1234, "top5": 0.5})
    return {"knn": knn, "finetune": finetuned, "probe": probe, "run": tmp_path / "runs", "ft": tmp_path / "ft"}


def test_table_holds_exactly_the_values_given(results: dict[str, Path]) -> None:
    table = build_report([results["knn"], results["finetune"], results["probe"]])
    assert table.rows == ["runs/simclr", "resnet18, random init (seed 0)"]
    assert table.columns == [("knn", "top1"), ("linear-probe", "top1"), ("finetune-10%", "top1"),
                             ("finetune-10%", "best.top1")]
    assert table.value("runs/simclr", ("knn", "top1")) == 0.6123
    assert table.value("runs/simclr", ("finetune-10%", "best.top1")) == 0.7712
    assert table.value("resnet18, random init (seed 0)", ("linear-probe", "top1")) == 0.1234
    assert table.value("resnet18, random init (seed 0)", ("knn", "top1")) is None
    assert to_markdown(table) == EXPECTED
    nested = build_report([results["knn"]], metrics=("per_k.20.top1", "top5"))
    assert nested.columns == [("knn", "per_k.20.top1"), ("knn", "top5")]
    assert nested.value("runs/simclr", ("knn", "top5")) == 0.9


def test_cli_reads_directories_and_writes_markdown(results: dict[str, Path], tmp_path: Path) -> None:
    (results["run"] / "results" / "predictions.json").write_text("[]")  # not a results file: skipped in a directory
    (results["run"] / "run.json").write_text('{"status": "finished"}')  # a run's status file: skipped too
    md = tmp_path / "report.md"
    args = ["report", str(results["run"]), str(results["ft"]), str(results["probe"])]
    result = runner.invoke(app, [*args, "--format", "markdown", "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    assert result.stdout == EXPECTED and md.read_text() == EXPECTED
    assert "skipped 2" in result.stderr
    folder = runner.invoke(app, ["report", str(results["run"] / "results"), "--format", "markdown"])  # a folder of files
    assert folder.exit_code == 0 and "61.23%" in folder.stdout
    again = runner.invoke(app, [*args, "--markdown", str(md)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    table = runner.invoke(app, [*args, "--markdown", str(md), "--overwrite"])
    assert table.exit_code == 0 and "61.23%" in table.stdout and "77.12%" in table.stdout


def test_the_newer_of_two_results_fills_a_cell(results: dict[str, Path], tmp_path: Path) -> None:
    older = json.loads(results["knn"].read_text())
    older["metrics"]["top1"] = 0.1
    older["time"]["created"] = "2000-01-01T00:00:00+00:00"
    (tmp_path / "older.json").write_text(json.dumps(older))
    table = build_report([results["knn"], tmp_path / "older.json"])
    assert table.value("runs/simclr", ("knn", "top1")) == 0.6123 and table.replaced == 1


@pytest.mark.parametrize(("make", "expected"), [
    ("foreign", "is not an sslcli results file"),
    ("broken", "is not a readable JSON file"),
    ("missing", "does not exist"),
    ("empty dir", "holds no results"),
    ("no such metric", "no results file has the metric(s) recall@1"),
    ("bad format", "--format must be one of table, markdown"),
])
def test_report_errors_are_one_line(make: str, expected: str, results: dict[str, Path], tmp_path: Path) -> None:
    target, extra = tmp_path / "x.json", []
    if make == "foreign":
        target.write_text(json.dumps({"accuracy": 0.5}))
    elif make == "broken":
        target.write_text("{")
    elif make == "empty dir":
        target = tmp_path / "empty"
        target.mkdir()
    elif make == "no such metric":
        target, extra = results["knn"], ["--metric", "recall@1"]
    elif make == "bad format":
        target, extra = results["knn"], ["--format", "html"]
    result = runner.invoke(app, ["report", str(results["probe"]), str(target), *extra])
    assert result.exit_code == 2, result.output
    assert expected in result.output and len(result.output.strip().splitlines()) == 1
