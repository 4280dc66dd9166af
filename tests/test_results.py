"""The one results format: every key of the schema, the method from the encoder's metadata, older files read back."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sslcli
from sslcli.cli.app import app
from sslcli.errors import UserError
from sslcli.evaluation import EncoderInfo
from sslcli.evaluation.results import RESULT_KEYS, SCHEMA, read_results, write_results


def _info(kind: str, metadata: dict[str, str]) -> EncoderInfo:
    return EncoderInfo(name="enc", kind=kind, arch="resnet18", image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3,
                       crop_pct=1.0, metadata=metadata)  # type: ignore[arg-type]


def test_knn_results_have_every_schema_key(synth_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "knn.json"
    result = CliRunner().invoke(app, ["knn", "--raw-pixels", "--image-size", "8", "--data", str(synth_data),
                                      "--seed", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert list(payload) == list(RESULT_KEYS)
    assert payload["schema"] == SCHEMA and payload["command"] == payload["protocol"] == "knn"
    assert payload["method"] is None  # raw pixels: nothing was pretrained
    assert payload["seed"] == 3 and payload["sslcli_version"] == sslcli.__version__
    created = datetime.datetime.fromisoformat(payload["time"]["created"])
    assert created.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 600
    assert payload["time"]["elapsed_s"] >= 0
    assert payload["data"]["train"]["num_samples"] == 600 and 0 <= payload["metrics"]["top1"] <= 1
    assert read_results(out) == payload


def test_method_protocol_seed_and_elapsed_time(tmp_path: Path) -> None:
    started = time.perf_counter() - 2.0
    path = write_results(tmp_path / "r.json", command="linear-probe", metrics={"top1": 0.5}, data={},
                         encoder=_info("weights", {"method": "mocov2"}), params={"seed": 7, "protocol": "mae"},
                         protocol="mae", started=started)
    payload = read_results(path)
    assert (payload["method"], payload["protocol"], payload["seed"]) == ("mocov2", "mae", 7)
    assert 2.0 <= payload["time"]["elapsed_s"] < 60
    # A random init of a run's architecture carries the run's metadata, but nothing was pretrained.
    baseline = write_results(tmp_path / "b.json", command="knn", metrics={}, data={}, params={},
                             encoder=_info("random_init", {"method": "mocov2"}))
    assert read_results(baseline)["method"] is None and read_results(baseline)["time"]["elapsed_s"] is None
    as_dict = write_results(tmp_path / "d.json", command="zero-shot", metrics={}, data={}, params={},
                            encoder={"run": "runs/clip", "method": "clip"})
    assert read_results(as_dict)["method"] == "clip" and read_results(as_dict)["seed"] is None


def test_version_1_files_are_read_in_the_current_shape(tmp_path: Path) -> None:
    old = {"command": "knn", "sslcli_version": "0.1.0", "created": "2026-11-24T01:55:00+00:00",
           "encoder": {"name": "runs/a (simclr, 3 epochs)", "kind": "weights", "run_dir": "runs/a",
                       "metadata": {"method": "simclr"}},
           "data": {"spec": "d"}, "params": {"k": [20], "seed": 0}, "metrics": {"top1": 0.25}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    payload = read_results(tmp_path / "old.json")
    assert list(payload) == list(RESULT_KEYS)
    assert payload["schema"] == SCHEMA and payload["protocol"] == "knn" and payload["method"] == "simclr"
    assert payload["time"] == {"created": "2026-11-24T01:55:00+00:00", "elapsed_s": None}
    assert payload["metrics"] == {"top1": 0.25} and payload["seed"] == 0


@pytest.mark.parametrize(("content", "expected"), [
    ("{not json", "not a readable JSON file"),
    ('{"a": 1}', "not an sslcli results file"),
    ('[1, 2]', "not an sslcli results file"),
    ('{"schema": 99, "command": "knn", "metrics": {}, "sslcli_version": "9"}', "newer than this sslcli"),
])
def test_foreign_files_are_refused(content: str, expected: str, tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(content)
    with pytest.raises(UserError, match=expected):
        read_results(tmp_path / "x.json")
