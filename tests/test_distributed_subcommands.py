"""The subcommands beyond pretrain / knn / linear-probe / embed under torchrun (issue 8), in real 2-rank gloo runs
against one process: finetune and distill train data-parallel to the one-process weights, zero-shot gives the
one-process results, the single-device commands run once on rank 0, and rank 1 writes no file.  Plus the
per-process batch and the SyncBN conversion, without a launch."""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import sslcli.distributed
from sslcli.cli.app import app
from sslcli.config import build_config
from sslcli.data.reader import resolve_source
from sslcli.data.synth import generate_synthetic
from sslcli.errors import UserError
from sslcli.evaluation.finetune import TrainSettings, per_process_batch
from sslcli.export import encoder_metadata, save_encoder
from sslcli.models.encoders import Encoder, EncoderSpec
from sslcli.pretrain import pretrain

from dist_launch import run_single, torchrun

VIEW_32 = ("augment.views=[{count: 1, size: 32, scale: [0.5, 1.0], flip: 0.5, jitter_p: 0.0, gray_p: 0.0, "
           "blur_p: 0.0}]")
FAST = {"epochs": 1, "batch_size": 16, "num_workers": 0}


def _vit_file(path: Path) -> Path:
    """A 2-block, 48-wide ViT on 32-px images in 4-px patches: LayerNorm only, no BatchNorm, no dropout, so
    its data-parallel gradients equal the one-process ones."""
    torch.manual_seed(0)
    kwargs = {"patch_size": 4, "img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 3}
    encoder = Encoder(EncoderSpec("vit_tiny_p4", "vit_tiny_patch16_224", kwargs))
    return save_encoder(encoder, path, encoder_metadata(encoder, method="simclr", image_size=32, mean=(0.5,) * 3,
                                                        std=(0.25,) * 3, epochs=1, eval_crop_pct="1.0"))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny data, a ViT file, 1-epoch CLIP and MAE runs and an image folder; then one plain launch and one
    2-rank torchrun launch of tests/dist/subcommands.py, side by side."""
    root = tmp_path_factory.mktemp("subcommands")
    data = root / "data"
    generate_synthetic(data, train=48, test=24, size=32, seed=0, shard_size=64)  # one shard: the sample split
    _vit_file(root / "vit.safetensors")
    clip = build_config("clip", "small", {**FAST, "data": str(data)}, [
        VIEW_32, "method_args.text_layers=1", "method_args.text_width=32", "method_args.embed_dim=32"])
    pretrain(clip, root / "clip", device="cpu")
    mae = build_config("mae", "small", {**FAST, "data": str(data), "arch": "vit_tiny_p8"}, [VIEW_32])
    pretrain(mae, root / "mae", device="cpu")
    for name, colour in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
        (root / "folder" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), colour).save(root / "folder" / name / f"{i}.png")
    with ThreadPoolExecutor(2) as pool:  # two cores, and each launch is mostly start-up
        launches = [pool.submit(run_single, "subcommands.py", str(root), "one"),
                    pool.submit(torchrun, "subcommands.py", str(root), "two", "--single-device")]
        for launch in launches:
            launch.result()
    return root


def _results(work: Path, tag: str, name: str) -> dict:
    return json.loads((work / f"{tag}-{name}").read_text())


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


TOLERANCE = 1e-5  # float rounding of sums over B vs 2 x B/2 images; measured below 1e-7


@pytest.mark.parametrize("output", ["ft/classifier.safetensors", "ft/best.safetensors",
                                    "distill/classifier.safetensors"])
def test_two_ranks_train_the_one_process_weights(work: Path, output: str) -> None:
    one, two = (load_file(work / f"{tag}-{output}") for tag in ("one", "two"))
    difference = _max_difference(one, two)
    # Where both runs started: the ViT file's backbone and SimCLR v2's zero-initialised head.
    start = {f"backbone.model.{k}": v for k, v in load_file(work / "vit.safetensors").items()}
    start.update({k: torch.zeros_like(one[k]) for k in ("fc.weight", "fc.bias")})
    moved = _max_difference({k: one[k] for k in start}, start)
    assert difference < TOLERANCE, difference
    assert moved > 100 * TOLERANCE, moved  # so a gradient not averaged, or the lr of B/2, would show


def _paths_dropped(metrics: dict) -> dict:
    """Metrics without the output paths, which name the launch."""
    return {k: _paths_dropped(v) if isinstance(v, dict) else v for k, v in metrics.items()
            if k not in ("predictions", "confusion_png", "png")}


def test_two_ranks_give_the_one_process_metrics(work: Path) -> None:
    for name in ("ft/results.json", "distill/results.json"):
        one, two = (_results(work, tag, name) for tag in ("one", "two"))
        assert (one["params"]["world_size"], two["params"]["world_size"]) == (1, 2), name
        for key in ("top1", "top5"):
            assert one["metrics"][key] == two["metrics"][key], (name, key)
        assert two["metrics"]["loss"] == pytest.approx(one["metrics"]["loss"], rel=1e-4)
    one, two = (_results(work, tag, "ft/results.json")["metrics"] for tag in ("one", "two"))
    assert one["best"]["epoch"] == two["best"]["epoch"] and one["best"]["top1"] == two["best"]["top1"]
    assert [e["top1"] for e in one["validation"]] == [e["top1"] for e in two["validation"]]
    assert len(one["validation"]) == 2
    for name in ("zs.json", "ret.json"):
        one, two = (_results(work, tag, name) for tag in ("one", "two"))
        assert _paths_dropped(one["metrics"]) == _paths_dropped(two["metrics"]), name
        assert (one["params"]["world_size"], two["params"]["world_size"]) == (1, 2), name
    zero_shot = _results(work, "two", "zs.json")["metrics"]
    assert zero_shot["images"] == 24 and list(zero_shot["few_shot"]["curve"]) == ["1", "2"]
    assert _results(work, "two", "ret.json")["metrics"]["images"] == 7  # --limit 7 over two ranks' shares
    one, two = ((work / f"{tag}-zs-predictions.csv").read_text() for tag in ("one", "two"))
    assert one == two and len(one.splitlines()) == 25


def test_single_device_commands_run_once_on_rank_0(work: Path) -> None:
    out = work / "two-single"
    for made in ("synth/index.json", "subset/index.json", "shards/index.json", "mae.safetensors",
                 "reconstruct/reconstruct.json", "training.png", "report.md"):
        assert (out / made).is_file(), made
    assert len(list((out / "attention").glob("*.png"))) == 2
    rank0, rank1 = (json.loads((work / f"writes-two-rank{r}.json").read_text()) for r in (0, 1))
    assert rank1 == []  # no classifier, results, prediction, cache or single-device output from rank 1
    for made in ("two-ft/classifier.safetensors", "two-ft/best.safetensors", "two-distill/results.json",
                 "two-zs-predictions.csv", "two-ret.json", "two-single/report.md"):
        assert any(path.endswith(made) for path in rank0), made


def test_per_process_batch_splits_the_global_batch(synth_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = resolve_source(synth_data, "train")  # 600 images
    monkeypatch.setattr(sslcli.distributed, "world_size", lambda: 4)
    assert per_process_batch(TrainSettings(batch_size=64), source, paired=False) == 16
    with pytest.raises(UserError, match="--batch-size 66 is not divisible by the 4 processes; pick a multiple of 4"):
        per_process_batch(TrainSettings(batch_size=66), source, paired=False)
    with pytest.raises(UserError, match="gives 3 images per process.*pick a multiple of 8"):
        per_process_batch(TrainSettings(batch_size=12), source, paired=True)
    assert per_process_batch(TrainSettings(batch_size=4096), source, paired=True) == 150  # the split, per process
    assert per_process_batch(TrainSettings(batch_size=4096), source, paired=False) == 150


def test_single_device_command_on_another_rank_returns_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "d"), "--train", "4", "--test", "2"])
    assert result.exit_code == 0 and result.output == "" and not (tmp_path / "d").exists()
    result = runner.invoke(app, ["export", str(tmp_path / "no-run")])  # bad input, but not this rank's to check
    assert result.exit_code == 0 and result.output == ""
    monkeypatch.setenv("RANK", "0")
    result = runner.invoke(app, ["export", str(tmp_path / "no-run")])
    assert result.exit_code == 2 and "error:" in result.output, result.output


def test_sync_batchnorm_keeps_timms_fused_activations(monkeypatch: pytest.MonkeyPatch) -> None:
    # finetune (on GPUs) and pretrain (sync_bn) convert BatchNorm; torch's own converter turns timm's
    # BatchNormAct2d into a plain SyncBatchNorm and drops its ReLU (RegNetY's output moved by 0.2).
    monkeypatch.setattr(sslcli.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(sslcli.distributed, "world_size", lambda: 2)
    torch.manual_seed(0)
    model = timm.create_model("regnety_002", num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
        converted = sslcli.distributed.convert_sync_batchnorm(copy.deepcopy(model)).eval()
        assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())  # every BN layer converted
        assert torch.allclose(converted(x), expected, atol=1e-6)
