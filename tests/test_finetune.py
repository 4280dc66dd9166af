"""Fine-tuning protocols: layer-wise lr decay, drop-path, mixup / cutmix, label fractions, best-epoch selection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import sslcli.evaluation.finetune as ft
import sslcli.evaluation.finetune_parts as parts
from sslcli.augment import eval_transform
from sslcli.cli.app import app
from sslcli.data.formats import iter_tar_samples
from sslcli.data.reader import build_loader, resolve_source
from sslcli.data.subset import split_labels, write_label_subset
from sslcli.errors import UserError
from sslcli.evaluation.finetune import TrainSettings, build_mixup, layer_decay_groups, soft_target_loss
from sslcli.evaluation.finetune_parts import labelled_parts, with_drop_path
from sslcli.evaluation.results import RESULT_KEYS
from sslcli.export import encoder_metadata, save_encoder
from sslcli.finetune import finetune
from sslcli.models.classifier import Classifier, load_classifier
from sslcli.models.encoders import Encoder, EncoderSpec, create_encoder

runner = CliRunner()
DEPTH = 3


def _tiny_vit(depth: int = DEPTH) -> Encoder:
    """A timm ViT on 32-px images in 4-px patches, 48 wide and ``depth`` blocks deep: quick to train on a CPU."""
    torch.manual_seed(0)
    kwargs = {"patch_size": 4, "img_size": 32, "depth": depth, "embed_dim": 48, "num_heads": 3}
    return Encoder(EncoderSpec("vit_tiny_p4", "vit_tiny_patch16_224", kwargs))


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported 2-block ViT recorded as a SimCLR encoder for 32-px whole images."""
    path = tmp_path_factory.mktemp("enc") / "vit.safetensors"
    encoder = _tiny_vit(2)
    save_encoder(encoder, path, encoder_metadata(encoder, method="simclr", image_size=32, mean=(0.5,) * 3,
                                                 std=(0.25,) * 3, epochs=1, eval_crop_pct="1.0"))
    return path


def test_layer_decay_groups_follow_the_beit_rule() -> None:
    decay, L = 0.75, DEPTH
    model = Classifier(_tiny_vit(), 10)
    groups = layer_decay_groups(model, decay)
    seen: dict[str, tuple[float, bool]] = {}
    by_id = {id(p): name for name, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            assert by_id[id(p)] not in seen  # every parameter in exactly one group
            seen[by_id[id(p)]] = (group["lr_scale"], group["apply_wd"])
    assert set(seen) == set(by_id.values())
    for name, p in model.named_parameters():
        inner = name.removeprefix("backbone.model.")
        if inner.split(".")[0] in ("cls_token", "pos_embed", "patch_embed"):
            scale = decay ** (L + 1)  # layer 0
        elif inner.startswith("blocks."):
            scale = decay ** (L - int(inner.split(".")[1]))  # block i is layer i + 1
        elif inner.startswith("norm."):
            scale = decay  # timm's grouping puts the final norm with the last block
        else:
            scale = 1.0  # the head (fc)
        decayed = p.ndim > 1 and inner not in ("cls_token", "pos_embed")
        assert seen[name][0] == pytest.approx(scale), name
        assert seen[name][1] is decayed, name
    with pytest.raises(UserError, match="transformer blocks"):
        layer_decay_groups(Classifier(create_encoder("resnet18"), 10), decay)


def test_drop_path_rebuilds_the_backbone_with_the_same_weights() -> None:
    encoder = _tiny_vit()
    rebuilt = with_drop_path(encoder, 0.2)
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in rebuilt.model.blocks]  # rate 0: Identity
    assert rates == pytest.approx(torch.linspace(0, 0.2, DEPTH).tolist())  # timm: linear over depth
    assert rebuilt.spec.timm_kwargs["drop_path_rate"] == 0.2 and "drop_path_rate" not in encoder.spec.timm_kwargs
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt.eval()(x), encoder.eval()(x))  # same weights; drop-path is off in eval


def test_mixup_and_cutmix_targets_are_timms() -> None:
    num_classes, smoothing = 10, 0.1
    off, on = smoothing / num_classes, 1 - smoothing + smoothing / num_classes
    y = torch.arange(8)  # y[i] != y.flip(0)[i] for every row
    smooth = torch.full((8, num_classes), off).scatter_(1, y[:, None], on)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    np.random.seed(0)
    mixed, target = build_mixup(TrainSettings(mixup=0.8), num_classes, smoothing)(x.clone(), y)
    lam = ((target[0, 0] - off) / (on - off)).item()
    assert 0 < lam < 1
    assert torch.allclose(target, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-6)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-5)

    mixed, target = build_mixup(TrainSettings(cutmix=1.0), num_classes, smoothing)(x.clone(), y)
    lam = ((target[0, 0] - off) / (on - off)).item()
    kept = (mixed == x).all(dim=1)  # pixels of each image's own, the rest come from its flipped partner
    assert torch.equal(mixed, torch.where(kept[:, None], x, x.flip(0)))
    assert kept[0].float().mean().item() == pytest.approx(lam, abs=1e-6)  # timm's box-corrected lambda

    logits = torch.randn(8, num_classes)
    expected = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    assert torch.allclose(soft_target_loss()(logits, x, {"soft_target": target}), expected)
    assert build_mixup(TrainSettings(), num_classes, smoothing) is None


def test_label_fraction_is_per_class_deterministic_and_data_subsets_images(synth_data: Path, tmp_path: Path) -> None:
    train = resolve_source(synth_data, "train")
    _, labels = split_labels(train)
    counts = np.bincount(labels)
    part, val = labelled_parts(train, label_fraction=0.1, val_fraction=None, seed=3)
    assert val is None and part.num_samples == len(part.keep) == int(np.maximum(1, np.round(0.1 * counts)).sum())
    kept_indices, kept_labels = split_labels(part)
    assert np.bincount(kept_labels, minlength=len(counts)).tolist() == np.maximum(1, np.round(0.1 * counts)).tolist()
    assert labelled_parts(train, label_fraction=0.1, val_fraction=None, seed=3)[0].keep == part.keep
    assert labelled_parts(train, label_fraction=0.1, val_fraction=None, seed=4)[0].keep != part.keep
    # The very images `sslcli data subset` writes for the same fraction and seed.
    write_label_subset(synth_data, tmp_path / "sub", fraction=0.1, seed=3)
    written = resolve_source(tmp_path / "sub", "train")
    src = {int(f["src_idx"]) for url in written.urls for _, f in iter_tar_samples(Path(url))}
    assert src == set(part.keep)
    # The loader yields exactly the kept samples, each once, with their labels.
    seen = {}
    for batch in build_loader(part, lambda im: torch.zeros(1), batch_size=16, shuffle=True, drop_last=False):
        seen.update(zip(batch["index"].tolist(), batch["label"].tolist(), strict=True))
    assert seen == dict(zip(kept_indices.tolist(), kept_labels.tolist(), strict=True))

    fit, held = labelled_parts(train, label_fraction=0.2, val_fraction=0.1, seed=3)
    assert held is not None and not fit.keep & held.keep
    assert fit.keep | held.keep == labelled_parts(train, label_fraction=0.2, val_fraction=None, seed=3)[0].keep
    assert np.bincount(split_labels(held)[1]).tolist() == [1] * len(counts)  # round(0.1 x 12), class-balanced
    with pytest.raises(UserError, match="without a training image"):
        labelled_parts(train, label_fraction=0.01, val_fraction=0.5, seed=0)  # 1 image per class


def test_best_epoch_is_the_best_validation_epoch(synth_data: Path, vit_file: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real = parts.evaluate_classifier
    val_top1 = iter([0.5, 0.7, 0.7])  # epochs 2, 4 and 5 (the last): the tie keeps epoch 4
    states: dict[int, dict[str, torch.Tensor]] = {}

    def fake(model: Classifier, source: Any, transform: Any, **kwargs: Any) -> dict[str, float]:
        if source.split == "train":  # the validation part
            states[len(states)] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return {"top1": next(val_top1), "top5": 1.0, "loss": 0.0}
        return real(model, source, transform, **kwargs)

    monkeypatch.setattr(parts, "evaluate_classifier", fake)
    settings = TrainSettings(epochs=5, batch_size=32, optimizer="adamw", lr=1e-3)
    out = tmp_path / "ft"
    metrics = finetune(str(vit_file), str(synth_data), out, settings=settings, label_fraction=0.05, eval_every=2,
                       device="cpu")  # 30 labelled images: 20 to train on (one step an epoch), 10 to validate
    assert [h["epoch"] for h in metrics["validation"]] == [2, 4, 5]
    assert metrics["best"]["epoch"] == 4 and metrics["best"]["val_top1"] == 0.7
    best = load_file(str(out / "best.safetensors"))
    assert all(torch.equal(best[k], states[1][k]) for k in states[1])
    last = load_file(str(out / "classifier.safetensors"))
    assert all(torch.equal(last[k], states[2][k]) for k in states[2])
    model, meta = load_classifier(out / "best.safetensors")
    assert meta["epoch"] == "4"
    test = resolve_source(synth_data, "test")
    tested = real(model, test, eval_transform(32, 1.0, (0.5,) * 3, (0.25,) * 3), device=torch.device("cpu"))
    assert metrics["best"]["top1"] == pytest.approx(tested["top1"])


def test_finetune_cli_with_the_mae_protocol_options(synth_data: Path, vit_file: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    optimizers: list[torch.optim.Optimizer] = []
    build = ft.build_optimizer
    monkeypatch.setattr(ft, "build_optimizer", lambda *a, **k: optimizers.append(build(*a, **k)) or optimizers[-1])
    out = tmp_path / "ft"
    result = runner.invoke(app, ["finetune", str(vit_file), "--data", str(synth_data), "--out", str(out),
                                 "--layer-decay", "0.75", "--drop-path", "0.1", "--mixup", "0.8", "--cutmix", "1.0",
                                 "--label-smoothing", "0.1", "--label-fraction", "0.1", "--epochs", "1",
                                 "--batch-size", "16", "--optimizer", "adamw", "--lr", "1e-3", "--warmup-epochs", "0.5",
                                 "--weight-decay", "0.05", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    # The scheduled lr reaches every group times its layer scale.
    head_lr = next(g["lr"] for g in optimizers[0].param_groups if g["lr_scale"] == 1.0)
    assert head_lr > 0
    for group in optimizers[0].param_groups:
        assert group["lr"] == pytest.approx(head_lr * group["lr_scale"])
        assert group["weight_decay"] == (pytest.approx(0.05) if group["apply_wd"] else 0.0)
    payload = json.loads((out / "results.json").read_text())
    assert list(payload) == list(RESULT_KEYS)
    assert payload["command"] == "finetune" and payload["protocol"] == "finetune-10%"
    assert payload["method"] == "simclr" and payload["seed"] == 0 and payload["time"]["elapsed_s"] > 0
    assert payload["data"]["train"]["num_samples"] == 60 and payload["data"]["test"]["num_samples"] == 300
    params = payload["params"]
    assert (params["layer_decay"], params["drop_path"], params["mixup"], params["cutmix"]) == (0.75, 0.1, 0.8, 1.0)
    assert 0 <= payload["metrics"]["top1"] <= 1 and "best" not in payload["metrics"]
    with safe_open(str(out / "classifier.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["timm_kwargs"])["drop_path_rate"] == 0.1
    assert not (out / "best.safetensors").exists()


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("enc") / "r18.safetensors"
    encoder = create_encoder("resnet18")
    save_encoder(encoder, path, encoder_metadata(encoder, method="simclr", image_size=32, mean=(0.5,) * 3,
                                                 std=(0.25,) * 3, epochs=1, eval_crop_pct="1.0"))
    return path


@pytest.mark.parametrize(("flags", "expected"), [
    (["--layer-decay", "0.75"], "transformer blocks"),
    (["--layer-decay", "1.5"], "--layer-decay must be in (0, 1]"),
    (["--mixup", "0.8", "--batch-size", "15"], "--batch-size must be even"),
    (["--val-fraction", "0.2"], "pass --eval-every"),
    (["--label-fraction", "0"], "--label-fraction must be in (0, 1]"),
    (["--random-init", "--keep-proj-layers", "1"], "no pretrained projector"),
    (["--drop-path", "1.0"], "--drop-path must be in [0, 1)"),
])
def test_finetune_errors_are_one_line(flags: list[str], expected: str, synth_data: Path, resnet_file: Path,
                                      tmp_path: Path) -> None:
    result = runner.invoke(app, ["finetune", str(resnet_file), "--data", str(synth_data), "--out",
                                 str(tmp_path / "ft"), "--epochs", "1", "--device", "cpu", *flags])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "ft" / "classifier.safetensors").exists()
