"""`sslcli zero-shot clip` / `retrieval`: labels and templates files, prompt-ensemble maths, the class-embedding
cache, and the commands end to end on a briefly trained CLIP run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.config import build_config
from sslcli.errors import UserError
from sslcli.evaluation.zero_shot import (BUILTIN_TEMPLATES, cached_class_embeddings, class_embeddings, predict,
                                        read_labels, read_templates)
from sslcli.pretrain import pretrain


def invoke(*args: str | Path):  # noqa: ANN201 - click's Result
    return CliRunner().invoke(app, [str(a) for a in args])


def test_labels_skip_blanks_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("# shapes\ncircle\n\n  square  \n# more\nstar\n")
    assert read_labels(path) == ["circle", "square", "star"]


@pytest.mark.parametrize("content, message", [
    ("", "is empty"), ("# only a comment\n\n", "is empty"), ("circle\nsquare\ncircle\n", "repeats 'circle' (lines 1 and 3)"),
])
def test_bad_labels_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "classes.txt"
    path.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_labels(path)


def test_templates_default_to_the_builtin_ensemble_and_need_one_slot(tmp_path: Path) -> None:
    assert read_templates(None) == list(BUILTIN_TEMPLATES) and all(t.count("{}") == 1 for t in BUILTIN_TEMPLATES)
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\n# skipped\na {} and a {}\n")
    with pytest.raises(UserError, match="line 3"):
        read_templates(path)
    path.write_text("a photo of a {}.\nart of the {}.\n")
    assert read_templates(path) == ["a photo of a {}.", "art of the {}."]


def test_class_embedding_is_the_normalised_mean_of_normalised_prompt_embeddings() -> None:
    table = {}
    g = torch.Generator().manual_seed(0)

    def encode(prompts: list[str]) -> torch.Tensor:  # an arbitrary, unnormalised embedding per prompt
        return torch.stack([table.setdefault(p, torch.randn(4, generator=g) * 3) for p in prompts])

    classes = class_embeddings(encode, ["cat", "dog"], ["a {}.", "a photo of a {}."])
    for row, label in zip(classes, ["cat", "dog"]):
        a, b = F.normalize(table[f"a {label}."], dim=0), F.normalize(table[f"a photo of a {label}."], dim=0)
        expected = (a + b) / (a + b).norm()
        assert torch.allclose(row, expected, atol=1e-6)
    probs = predict(torch.stack([classes[1] * 5, classes[0]]), classes, 100.0)
    assert probs.argmax(1).tolist() == [1, 0] and torch.allclose(probs.sum(1), torch.ones(2))


def test_cache_is_reused_and_a_damaged_entry_recomputed(tmp_path: Path) -> None:
    value = torch.randn(3, 4)
    first, cached = cached_class_embeddings(tmp_path, "k1", lambda: value)
    assert not cached and torch.equal(first, value)
    again, cached = cached_class_embeddings(tmp_path, "k1", lambda: pytest.fail("recomputed a cached entry"))
    assert cached and torch.equal(again, value)
    (tmp_path / "classes-k1.safetensors").write_bytes(b"garbage")
    fixed, cached = cached_class_embeddings(tmp_path, "k1", lambda: value * 2)
    assert not cached and torch.equal(fixed, value * 2)


@pytest.fixture(scope="module")
def clip_run(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = build_config("clip", "small", {"epochs": 1, "batch_size": 64, "num_workers": 0, "data": str(synth_data)})
    return pretrain(cfg, tmp_path_factory.mktemp("clip") / "run", device="cpu")


def test_zero_shot_clip_writes_predictions_metrics_confusion_and_few_shot(clip_run: Path, synth_data: Path) -> None:
    result = invoke("zero-shot", "clip", clip_run, synth_data, "--labels", synth_data / "classes.txt",
                    "--shots", "1,2", "--seeds", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    payload = json.loads((clip_run / "results" / "zero-shot.json").read_text())
    metrics = payload["metrics"]
    assert payload["command"] == "zero-shot" and metrics["images"] == metrics["labelled"] == 300
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 1
    matrix = torch.tensor(metrics["confusion"])
    assert matrix.shape == (10, 10) and matrix.sum() == 300 and matrix.sum(1).tolist() == [30] * 10
    assert matrix.diag().sum().item() == round(metrics["top1"] * 300)
    rows = list(csv.DictReader((clip_run / "results" / "zero-shot-predictions.csv").open()))
    assert len(rows) == 300 and rows[0]["image"] == "shapes/test/000000"
    assert rows[0]["label"] in read_labels(synth_data / "classes.txt")
    assert float(rows[0]["prob1"]) >= float(rows[0]["prob2"]) >= float(rows[0]["prob5"])
    for png in ("zero-shot-confusion.png", "zero-shot-few-shot.png"):
        assert Image.open(clip_run / "results" / png).size[0] > 100
    curve = metrics["few_shot"]["curve"]
    assert list(curve) == ["1", "2"] and all(len(point["runs"]) == 2 for point in curve.values())
    assert metrics["few_shot"]["zero_shot_top1"] == metrics["top1"]
    again = invoke("zero-shot", "clip", clip_run, synth_data, "--labels", synth_data / "classes.txt",
                   "--predictions", clip_run / "p.json", "--top-k", "2", "--limit", "7", "--device", "cpu")
    assert again.exit_code == 0 and "from the cache" in again.output, again.output
    predictions = json.loads((clip_run / "p.json").read_text())
    assert len(predictions) == 7 and set(predictions[0]) == {"image", "label", "top1", "top2", "prob1", "prob2"}


def test_zero_shot_single_image_files_without_labels(clip_run: Path, synth_data: Path, tmp_path: Path) -> None:
    image = tmp_path / "drawing.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    labels = tmp_path / "labels.txt"
    labels.write_text("circle\nsquare\n")
    out = tmp_path / "zs.json"
    result = invoke("zero-shot", "clip", clip_run, image, "--labels", labels, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["images"] == 1 and "top1" not in metrics  # nothing to score against
    rows = list(csv.DictReader((tmp_path / "zs-predictions.csv").open()))
    assert rows[0]["image"] == str(image) and {rows[0]["top1"], rows[0]["top2"]} == {"circle", "square"}


def test_retrieval_reports_recall_and_chance(clip_run: Path, synth_data: Path) -> None:
    result = invoke("zero-shot", "retrieval", clip_run, synth_data, "--device", "cpu")
    assert result.exit_code == 0, result.output
    metrics = json.loads((clip_run / "results" / "retrieval.json").read_text())["metrics"]
    assert metrics["images"] == 300 and 1 < metrics["unique_captions"] <= 300
    for direction in ("image_to_text", "text_to_image"):
        assert 0 <= metrics[f"{direction}_r1"] <= metrics[f"{direction}_r5"] <= metrics[f"{direction}_r10"] <= 1
        assert 0 < metrics[f"{direction}_chance_r5"] < 0.2


@pytest.mark.parametrize("case, expected", [
    ("empty", "is empty"), ("duplicates", "repeats 'circle'"), ("missing", "does not exist"),
    ("not-clip", "zero-shot takes a CLIP run"), ("shots", "--shots takes numbers separated by commas"),
    ("predictions", "must end in .csv or .json"), ("top-k", "--top-k must be at least 1"),
])
def test_user_errors_are_one_line_and_exit_2(case: str, expected: str, clip_run: Path, synth_data: Path,
                                             tmp_path: Path) -> None:
    labels = tmp_path / "classes.txt"
    labels.write_text({"empty": "\n# nothing\n", "duplicates": "circle\ncircle\n"}.get(case, "circle\nsquare\n"))
    run = clip_run
    if case == "not-clip":
        run = tmp_path / "simclr"
        pretrain(build_config("simclr", "small", {"epochs": 1, "batch_size": 300, "num_workers": 0,
                                                  "data": str(synth_data)}), run, device="cpu")
    before = sorted(p.name for p in (clip_run / "results").glob("*")) if (clip_run / "results").exists() else []
    args = ["zero-shot", "clip", run, synth_data, "--labels", tmp_path / "nope.txt" if case == "missing" else labels,
            "--device", "cpu", *{"shots": ["--shots", "1,x"], "predictions": ["--predictions", tmp_path / "p.txt"],
                                 "top-k": ["--top-k", "0"]}.get(case, [])]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], result.stderr
    assert "Traceback" not in result.output
    after = sorted(p.name for p in (clip_run / "results").glob("*")) if (clip_run / "results").exists() else []
    assert after == before
