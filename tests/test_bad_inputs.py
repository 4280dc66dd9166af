"""The bad-input matrix: every case runs through the real CLI and must end with exit code 2, its one-line
message, no traceback, and every file of the existing run and dataset exactly as it was.

``CASES`` is also the table of docs/bad-inputs.md: :func:`test_every_case_is_in_the_docs_table` fails when
a case lacks its row (id and message), so the two cannot drift apart.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bad_inputs_doc import DOC, catalogue, current_catalogue
from typer.testing import CliRunner

from sslcli import atomic
from sslcli.augment import IMAGENET_MEAN, IMAGENET_STD
from sslcli.cli.app import app
from sslcli.data.synth import generate_synthetic
from sslcli.engine.metrics import configure
from sslcli.errors import UserError
from sslcli.export import encoder_metadata, save_encoder
from sslcli.models.encoders import create_encoder
from sslcli.run_lock import LOCK_NAME, run_lock

SMALL = ("--recipe", "small", "--epochs", "1", "--batch-size", "64", "--num-workers", "0", "--device", "cpu")


@dataclass(frozen=True)
class Case:
    """``args`` may name ``{run}`` (a finished MAE run), ``{data}`` (a labelled dataset of 64 + 32 images),
    ``{busy}`` (a run another process is writing), ``{files}`` (the broken inputs) and ``{tmp}`` (a fresh
    directory per case).  ``setup``: ``disk_full`` makes every atomic write fail with ENOSPC; ``locked``
    holds ``{busy}``'s lock during the command."""

    id: str
    args: tuple[str, ...]
    message: str
    setup: str = ""


def case(id: str, command: str, message: str, setup: str = "") -> Case:  # noqa: A002 - the pytest word
    return Case(id, tuple(command.split()), message, setup)


CASES: list[Case] = [
    # pretrain
    case("pretrain-data-missing", "pretrain simclr --data {tmp}/nope --out {tmp}/r", "does not exist"),
    case("pretrain-data-not-a-dataset", "pretrain simclr --data {files}/notes.txt --out {tmp}/r",
         "is a file but neither a .tar shard nor index.json"),
    case("pretrain-no-data", "pretrain simclr --out {tmp}/r", "no training data"),
    case("pretrain-unknown-method", "pretrain simclrr --data {data} --out {tmp}/r", "unknown method 'simclrr'"),
    case("pretrain-unknown-arch",
         "pretrain simclr --recipe small --batch-size 32 --arch resnet81 --data {data} --out {tmp}/r",
         "unknown architecture 'resnet81'"),
    case("pretrain-unknown-recipe", "pretrain simclr --recipe tiny --data {data} --out {tmp}/r",
         "unknown recipe 'tiny' for simclr"),
    case("pretrain-missing-recipe-file", "pretrain simclr --recipe {tmp}/mine.yaml --data {data} --out {tmp}/r",
         "does not exist; pass a variant name or an existing YAML file"),
    case("pretrain-recipe-yaml-syntax", "pretrain simclr --recipe {files}/broken.yaml --data {data} --out {tmp}/r",
         "is not valid YAML at line 3"),
    case("pretrain-recipe-not-mapping", "pretrain simclr --recipe {files}/list.yaml --data {data} --out {tmp}/r",
         "must hold a mapping of config keys"),
    case("pretrain-unknown-set-key", "pretrain simclr --set optim.lrr=1 --data {data} --out {tmp}/r",
         "unknown config key 'optim.lrr'"),
    case("pretrain-set-without-value", "pretrain simclr --set optim.lr --data {data} --out {tmp}/r",
         "use --set key=value"),
    case("pretrain-set-wrong-type", "pretrain simclr --set epochs=many --data {data} --out {tmp}/r",
         "config key 'epochs' must be"),
    case("pretrain-negative-lr", "pretrain simclr --lr -0.1 --data {data} --out {tmp}/r",
         "--lr (optim.lr) must be positive"),
    case("pretrain-zero-batch", "pretrain simclr --batch-size 0 --data {data} --out {tmp}/r",
         "--batch-size (batch_size) must be at least 1"),
    case("pretrain-negative-batch", "pretrain simclr --batch-size -8 --data {data} --out {tmp}/r",
         "--batch-size (batch_size) must be at least 1"),
    case("pretrain-zero-epochs", "pretrain simclr --epochs 0 --data {data} --out {tmp}/r",
         "--epochs (epochs) must be at least 1"),
    case("pretrain-negative-workers", "pretrain simclr --num-workers -1 --data {data} --out {tmp}/r",
         "--num-workers (num_workers) must be 0 or more"),
    case("pretrain-negative-weight-decay", "pretrain simclr --set optim.weight_decay=-1 --data {data} --out {tmp}/r",
         "optim.weight_decay must be 0 or more"),
    case("pretrain-batch-exceeds-data", "pretrain simclr --recipe small --batch-size 4096 --data {data} --out {tmp}/r",
         "exceeds the 64 samples per process"),
    case("pretrain-out-holds-finished-run", "pretrain mae --recipe small --data {data} --out {run}",
         "already holds a finished run"),
    case("pretrain-out-holds-unfinished-run", "pretrain mae --recipe small --data {data} --out {busy}",
         "already holds an unfinished run"),
    case("pretrain-out-in-use", "pretrain mae --recipe small --batch-size 32 --data {data} --out {busy} --resume",
         "is in use by another sslcli process", setup="locked"),
    case("pretrain-resume-and-overwrite", "pretrain mae --data {data} --out {run} --resume --overwrite",
         "--resume and --overwrite contradict each other"),
    case("pretrain-nothing-to-resume", "pretrain simclr --recipe small --data {data} --out {tmp}/r --resume",
         "nothing to resume"),
    case("pretrain-no-cuda", "pretrain simclr --recipe small --device cuda:7 --data {data} --out {tmp}/r",
         "CUDA is not available"),
    # knn and the other evaluations
    case("knn-source-missing", "knn {tmp}/nope --data {data}", "does not exist; pass a run directory"),
    case("knn-source-not-weights", "knn {files}/notes.txt --data {data}",
         "is neither a run directory nor a .safetensors file"),
    case("knn-data-missing", "knn {run} --data {tmp}/nope", "data path"),
    case("knn-k-above-memory", "knn {run} --data {data} --k 500", "k=500 is not between 1 and the memory size 64"),
    case("knn-k-zero", "knn {run} --data {data} --k 0", "k=0 is not between 1 and the memory size"),
    case("knn-negative-temperature", "knn {run} --data {data} --temperature -1", "--temperature must be positive"),
    case("knn-zero-batch", "knn {run} --data {data} --batch-size 0", "--batch-size must be at least 1"),
    case("knn-corrupt-safetensors", "knn {files}/truncated.safetensors --data {data}",
         "is not a readable safetensors file"),
    case("knn-weights-of-another-arch", "knn {files}/resnet18.safetensors --arch vit_tiny_p4 --data {data}",
         "holds a resnet18 encoder, not vit_tiny_p4"),
    case("linear-probe-source-missing", "linear-probe {tmp}/nope --data {data}", "does not exist"),
    case("linear-probe-data-missing", "linear-probe {run} --data {tmp}/nope", "data path"),
    case("linear-probe-negative-lr", "linear-probe {run} --data {data} --lr -1",
         "--lr values must be finite and positive"),
    case("linear-probe-zero-epochs", "linear-probe {run} --data {data} --epochs 0", "--epochs must be at least 1"),
    case("finetune-source-missing", "finetune {tmp}/nope --data {data} --out {tmp}/ft", "does not exist"),
    case("finetune-data-missing", "finetune {run} --data {tmp}/nope --out {tmp}/ft", "data path"),
    case("finetune-negative-lr", "finetune {run} --data {data} --lr -0.1 --out {tmp}/ft", "--lr must be positive"),
    case("embed-source-missing", "embed {tmp}/nope --data {data}", "does not exist"),
    case("embed-data-missing", "embed {run} --data {tmp}/nope", "data path"),
    case("distill-teacher-missing", "distill {tmp}/nope --data {data} --out {tmp}/st",
         "is not a readable safetensors file"),
    # export, plot and the per-image commands
    case("export-run-missing", "export {tmp}/nope --out {tmp}/e.safetensors", "does not exist"),
    case("export-out-exists", "export {run} --out {run}/encoder.safetensors", "already exists; pass --overwrite"),
    case("export-disk-full", "export {run} --out {tmp}/e.safetensors", "no space left writing", setup="disk_full"),
    case("plot-disk-full", "plot {run}", "no space left writing '{run}/plots/training.png'", setup="disk_full"),
    case("plot-run-missing", "plot {tmp}/nope", "is not a directory"),
    case("plot-no-metrics", "plot {data}", "metrics.jsonl' does not exist"),
    case("plot-out-not-png", "plot {run} --out {tmp}/curves.jpg", "must end in .png"),
    case("reconstruct-run-missing", "reconstruct {tmp}/nope {data} --out {tmp}/rec", "does not exist"),
    case("reconstruct-images-missing", "reconstruct {run} {tmp}/nope --out {tmp}/rec", "data path"),
    case("reconstruct-mask-ratio-one", "reconstruct {run} {data} --mask-ratio 1 --out {tmp}/rec",
         "--mask-ratio must be in [0, 1)"),
    case("attention-source-missing", "attention {tmp}/nope {data} --out {tmp}/att", "does not exist"),
    case("attention-images-missing", "attention {run} {tmp}/nope --out {tmp}/att", "data path"),
    # zero-shot (the labels are read before the run is loaded)
    case("zero-shot-labels-missing", "zero-shot clip {run} {data} --labels {tmp}/classes.txt",
         "labels file '{tmp}/classes.txt' does not exist"),
    case("zero-shot-labels-empty", "zero-shot clip {run} {data} --labels {files}/empty.txt", "is empty"),
    case("zero-shot-labels-duplicate", "zero-shot clip {run} {data} --labels {files}/duplicates.txt",
         "repeats 'cat' (lines 1 and 3)"),
    case("zero-shot-not-clip", "zero-shot retrieval {run} {data}", "is a mae run; it has no text tower"),
    case("zero-shot-run-missing", "zero-shot retrieval {tmp}/nope {data}", "does not exist"),
    # report and data
    case("report-path-missing", "report {tmp}/nope.json", "does not exist"),
    case("report-not-json", "report {files}/notes.txt", "is not a readable JSON file"),
    case("data-shards-source-missing", "data shards {tmp}/nope {tmp}/shards", "is not a directory"),
    case("data-subset-source-missing", "data subset {tmp}/nope {tmp}/sub --fraction 0.1", "does not exist"),
    case("data-subset-fraction-above-one", "data subset {data} {tmp}/sub --fraction 1.5",
         "--fraction must be in (0, 1]"),
    case("data-info-missing", "data info {tmp}/nope", "does not exist"),
    case("data-synth-into-dataset", "data synth {data}", "already holds a dataset"),
    case("data-synth-zero-train", "data synth {tmp}/syn --train 0", "--train must be at least 1"),
    # the global options
    case("log-format-unknown", "--log-format xml data info {data}", "--log-format must be text or json"),
]

@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dataset, a finished 1-epoch MAE run (trained through the CLI with JSON logs), a run that looks
    in progress, and the broken input files."""
    root = tmp_path_factory.mktemp("bad-inputs")
    data = root / "data"
    generate_synthetic(data, train=64, test=32, size=32, seed=0, shard_size=32)
    run = root / "run"
    result = CliRunner().invoke(app, ["--log-format", "json", "pretrain", "mae", *SMALL, "--arch", "vit_tiny_p4",
                                      "--data", str(data), "--out", str(run)])
    configure()  # the JSON logging that call set would otherwise last into the first case
    assert result.exit_code == 0, result.output
    (root / "pretrain-log.txt").write_text(result.output)
    busy = root / "busy"
    shutil.copytree(run, busy)
    (busy / "run.json").write_text(json.dumps({"status": "running", "epochs": 1}))
    files = root / "files"
    files.mkdir()
    (files / "notes.txt").write_text("not a dataset\n")
    (files / "empty.txt").write_text("# no classes yet\n\n")
    (files / "duplicates.txt").write_text("cat\ndog\ncat\n")
    (files / "broken.yaml").write_text("method: simclr\noptim: {lr: [1,\n")
    (files / "list.yaml").write_text("- epochs: 3\n")
    (files / "truncated.safetensors").write_bytes((run / "encoder.safetensors").read_bytes()[:1000])
    encoder = create_encoder("resnet18")
    save_encoder(encoder, files / "resnet18.safetensors", encoder_metadata(
        encoder, method="none", image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, epochs=0, eval_crop_pct=1.0))
    return {"root": root, "data": data, "run": run, "busy": busy, "files": files}


def snapshot(*dirs: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``dirs``: size, mtime and content hash.  Not the run lock, which holds no user data
    (only the pid of the last process to open the run)."""
    state = {}
    for top in dirs:
        for path in sorted(top.rglob("*")):
            if path.is_file() and path.name != LOCK_NAME:
                stat = path.stat()
                state[str(path)] = (stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


@pytest.fixture
def disk_full(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every write through sslcli.atomic fails as a full disk does, when the data is flushed."""
    def no_space(path: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(atomic, "fsync_file", no_space)
    yield


@pytest.mark.parametrize("bad", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input(bad: Case, world: dict[str, Path], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    places = {name: str(path) for name, path in world.items()} | {"tmp": str(tmp_path)}
    args = [arg.format(**places) for arg in bad.args]
    if bad.setup == "disk_full":
        request.getfixturevalue("disk_full")
    before = snapshot(world["run"], world["busy"], world["data"])
    if bad.setup == "locked":
        with run_lock(world["busy"]):
            result = CliRunner().invoke(app, args)
    else:
        result = CliRunner().invoke(app, args)
    output = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a UserError, not a crash
    assert "Traceback" not in result.output
    assert "error: " in output, result.output
    assert bad.message.format(**places) in output, result.output
    assert snapshot(world["run"], world["busy"], world["data"]) == before


def test_pretrain_json_logs_are_one_object_per_line(world: dict[str, Path]) -> None:
    lines = (world["root"] / "pretrain-log.txt").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert records and {r["level"] for r in records} <= {"info", "warning"}
    assert any(r.get("event") == "metrics" and "loss" in r for r in records)
    assert any("done:" in r.get("message", "") for r in records)


@pytest.mark.parametrize("bad_id", ["pretrain-recipe-yaml-syntax", "knn-corrupt-safetensors"])
def test_a_real_process_prints_one_line_and_no_traceback(bad_id: str, world: dict[str, Path], tmp_path: Path) -> None:
    bad = next(c for c in CASES if c.id == bad_id)
    places = {name: str(path) for name, path in world.items()} | {"tmp": str(tmp_path)}
    env = {**os.environ, "COLUMNS": "400"}
    proc = subprocess.run([sys.executable, "-m", "sslcli", *[a.format(**places) for a in bad.args]],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and bad.message in proc.stderr


def test_every_case_is_in_the_docs_table() -> None:
    rows = {m.group(1): line for line in DOC.read_text().splitlines() if (m := re.match(r"\| `([a-z0-9-]+)` \|", line))}
    missing = [c.id for c in CASES if c.id not in rows]
    assert not missing, f"add rows for {missing} to {DOC}"
    placeholders = {name: name.upper() for name in ("run", "data", "busy", "files", "tmp")}  # as the table writes them
    unmatched = [c.id for c in CASES if c.message.format(**placeholders).replace("|", "\\|")
                 not in rows[c.id].replace("`", "")]
    assert not unmatched, f"the rows of {unmatched} in {DOC} do not quote the tested message"


def test_the_docs_catalogue_lists_every_user_error_in_the_source() -> None:
    assert current_catalogue(DOC.read_text()) == catalogue(), \
        "a UserError was added or changed: run `.venv/bin/python tests/bad_inputs_doc.py` and review the diff"


def test_the_run_lock_is_held_across_processes_and_dropped_when_its_holder_is_killed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sslcli.run_lock import run_lock\n"
         f"with run_lock({str(run)!r}):\n    print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"is in use by another sslcli process \\(pid {holder.pid}\\)"):
            with run_lock(run):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs, the kernel alone releases the lock
        holder.wait()
    with run_lock(run):
        assert (run / ".lock").read_text().strip() == str(os.getpid())
