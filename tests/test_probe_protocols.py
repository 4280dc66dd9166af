"""Linear-probe protocols (custom, moco, mae, fast), lr / weight-decay sweeps on a validation split, few-shot
probes, and their one-line CLI errors.  Features are synthetic tensors; only the CLI tests read images."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from timm.optim import Lars
from torch import nn
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.errors import UserError
from sslcli.evaluation import linear_probe as lp
from sslcli.evaluation.features import LabelledFeatures
from sslcli.evaluation.logistic import balanced_shots, fit_logistic, predict_logistic, standardise
from sslcli.evaluation.probe_heads import LinearHead, LogisticHead, fit_linear_heads, fit_probe_heads, head_optimizer
from sslcli.evaluation.probe_protocols import resolve_protocol, validation_split

NUM_CLASSES = 5


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: extra intra-op threads only add OpenMP spin-waits (L-BFGS fits ~30x slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(n: int, *, seed: int, spread: float = 1.5, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping Gaussian blobs (so accuracies differ between settings), offset and scaled by 10."""
    centres = torch.randn(NUM_CLASSES, dim, generator=torch.Generator().manual_seed(7)) * 2
    labels = torch.arange(n) % NUM_CLASSES
    feats = centres[labels] + spread * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return 10 * feats + 5, labels


def features() -> LabelledFeatures:
    train_x, train_y = blobs(200, seed=0)
    test_x, test_y = blobs(100, seed=1)
    return LabelledFeatures(train_x, train_y, test_x, test_y, NUM_CLASSES)


# The papers' values, written out independently of the PROTOCOLS table.
DOCUMENTED = {
    "custom": dict(solver="minibatch", optimizer="sgd", lrs=(0.1,), weight_decays=(0.0,), epochs=100, batch_size=256,
                   warmup_epochs=0.0, schedule="cosine", milestones=(), bn_head=False, standardize=True),
    "moco": dict(solver="minibatch", optimizer="sgd", lrs=(30.0,), weight_decays=(0.0,), epochs=100, batch_size=256,
                 warmup_epochs=0.0, schedule="step", milestones=(60.0, 80.0), bn_head=False, standardize=False),
    "mae": dict(solver="minibatch", optimizer="lars", lrs=(0.1 * 16384 / 256,), weight_decays=(0.0,), epochs=90,
                batch_size=16384, warmup_epochs=10.0, schedule="cosine", milestones=(), bn_head=True,
                standardize=False),
    "fast": dict(solver="lbfgs", lrs=(), weight_decays=(1e-3,), standardize=True, bn_head=False),
}


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_protocols_resolve_to_the_documented_settings(name: str) -> None:
    settings = resolve_protocol(name)
    for key, value in DOCUMENTED[name].items():
        assert getattr(settings, key) == pytest.approx(value), key
    assert settings.as_params()["protocol"] == name


def test_explicit_options_override_and_mae_batch_follows_the_data() -> None:
    mae = resolve_protocol("mae", num_train=1000)  # batch min(16384, N), lr 0.1 x batch / 256
    assert (mae.batch_size, mae.lrs) == (1000, (pytest.approx(0.1 * 1000 / 256),))
    assert resolve_protocol("mae", lr=[0.5], num_train=1000).lrs == (0.5,)  # an explicit lr is never scaled
    moco = resolve_protocol("moco", epochs=10, optimizer="adamw", standardize=True)
    assert (moco.milestones, moco.optimizer, moco.standardize, moco.lrs) == ((6.0, 8.0), "adamw", True, (30.0,))
    assert resolve_protocol("mae", epochs=45).warmup_epochs == pytest.approx(5.0)
    assert resolve_protocol("custom", optimizer="adamw").lrs == (1e-3,)
    sweep = resolve_protocol("custom", lr=[0.01, 0.1], weight_decay=[0.0, 1e-4])
    assert sweep.is_sweep and sweep.grid == [(0.01, 0.0), (0.01, 1e-4), (0.1, 0.0), (0.1, 1e-4)]
    with pytest.raises(UserError, match="does not apply to --protocol fast"):
        resolve_protocol("fast", lr=[0.1])


def test_mae_head_is_affine_free_bn_and_lars_adapts_the_weight_at_zero_wd() -> None:
    x, y = blobs(64, seed=2)
    settings = resolve_protocol("mae", epochs=2, batch_size=16, num_train=64)
    (fit,) = fit_linear_heads(x, y, num_classes=NUM_CLASSES, settings=settings)
    norm = fit.head.norm
    assert isinstance(norm, nn.BatchNorm1d) and not norm.affine and norm.eps == 1e-6
    assert torch.equal(fit.head.mean, torch.zeros(16)) and torch.equal(fit.head.std, torch.ones(16))

    # One LARS step against MAE's rule: weight -= lr * (0.001 ||w|| / ||g||) g; the bias takes a plain step.
    head = LinearHead(torch.zeros(16), torch.ones(16), NUM_CLASSES, bn=True)
    opt, cfg = head_optimizer(head, settings, 0.5, 0.0)
    assert isinstance(opt, Lars)
    torch.nn.functional.cross_entropy(head(x), y).backward()
    w, g, b, gb = (t.detach().clone() for t in (head.fc.weight, head.fc.weight.grad, head.fc.bias, head.fc.bias.grad))
    opt.step()
    assert torch.allclose(head.fc.weight, w - 0.5 * (1e-3 * w.norm() / g.norm()) * g, atol=1e-7, rtol=0)
    assert torch.allclose(head.fc.bias, b - 0.5 * gb, atol=1e-7, rtol=0)


def test_standardisation_per_protocol() -> None:
    x, y = blobs(60, seed=3)
    for name, standardised in (("moco", False), ("custom", True)):
        (fit,) = fit_probe_heads(x, y, num_classes=NUM_CLASSES, settings=resolve_protocol(name, epochs=1))
        expected_mean = x.mean(0) if standardised else torch.zeros(16)
        assert torch.allclose(fit.head.mean, expected_mean), name
    (fast,) = fit_probe_heads(x, y, num_classes=NUM_CLASSES, settings=resolve_protocol("fast"))
    assert isinstance(fast.head, LogisticHead)
    assert torch.allclose(fast.head.mean, x.double().mean(0)) and torch.allclose(fast.head.std, x.double().std(0, unbiased=False))


@pytest.mark.parametrize("name", ["custom", "mae"])
def test_a_sweep_head_equals_the_single_probe_with_its_lr(name: str) -> None:
    x, y = blobs(90, seed=4)
    lrs = [0.03, 0.3, 3.0] if name == "custom" else [1.0, 10.0, 100.0]  # LARS steps are 1000x smaller
    overrides: dict[str, Any] = {"epochs": 4, "batch_size": 16, "bn_head": True, "num_train": 90}
    sweep = fit_linear_heads(x, y, num_classes=NUM_CLASSES, seed=5,
                             settings=resolve_protocol(name, lr=lrs, **overrides))
    for lr, fit in zip(lrs, sweep, strict=True):
        (alone,) = fit_linear_heads(x, y, num_classes=NUM_CLASSES, seed=5,
                                    settings=resolve_protocol(name, lr=[lr], **overrides))
        assert fit.lr == lr and fit.train_loss == alone.train_loss
        for key, value in alone.head.state_dict().items():
            assert torch.equal(fit.head.state_dict()[key], value), (lr, key)
    first, *others = (fit.head.fc.weight for fit in sweep)
    assert not any(torch.equal(first, other) for other in others)  # the heads really differ


def test_sweep_table_matches_single_probes_and_skips_a_diverged_lr() -> None:
    feats = features()
    sweep = lp.probe_features(feats, resolve_protocol("custom", lr=[0.01, 1.0, 1e38], epochs=5), val_fraction=0.2)
    table = sweep.metrics["sweep"]
    assert set(table) == {"lr=0.01", "lr=1.0", "lr=1e+38"}
    assert table["lr=1e+38"]["test_top1"] is None  # diverged: kept out of the choice, not an error
    for lr in (0.01, 1.0):
        single = lp.probe_features(feats, resolve_protocol("custom", lr=[lr], epochs=5), val_fraction=0.2)
        assert table[f"lr={lr}"]["test_top1"] == single.metrics["top1"]
        assert table[f"lr={lr}"]["val_top1"] == single.metrics["val_top1"]
    best = max((0.01, 1.0), key=lambda lr: (table[f"lr={lr}"]["val_top1"], -table[f"lr={lr}"]["val_loss"]))
    assert sweep.params["lr"] == best and sweep.metrics["top1"] == table[f"lr={best}"]["test_top1"]
    assert sweep.params["lr_sweep"] == [0.01, 1.0, 1e38] and sweep.params["protocol"] == "custom"


def test_validation_is_class_balanced_seeded_and_disjoint_from_training_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    train, val = validation_split(labels, 0.1, seed=3)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))  # disjoint and complete
    assert [int((labels[val] == c).sum()) for c in range(3)] == [5, 3, 2]  # round(0.1 * n_c) per class
    assert torch.equal(val, validation_split(labels, 0.1, seed=3)[1])
    assert not torch.equal(val, validation_split(labels, 0.1, seed=4)[1])
    with pytest.raises(UserError, match="leaves none to train on"):
        validation_split(torch.tensor([0, 0, 0, 1]), 0.3, seed=0)

    feats = features()
    seen: list[torch.Tensor] = []
    real = lp.fit_probe_heads
    monkeypatch.setattr(lp, "fit_probe_heads", lambda x, *a, **k: seen.append(x) or real(x, *a, **k))
    report = lp.probe_features(feats, resolve_protocol("fast", weight_decay=[1e-3, 1e-1]), val_fraction=0.1, seed=3)
    train_rows, val_rows = validation_split(feats.train_y, 0.1, seed=3)
    assert torch.equal(seen[0], feats.train_x[train_rows])  # the probe never saw a validation row
    assert (report.metrics["train_samples"], report.metrics["val_samples"]) == (180, 20)
    assert set(report.metrics["sweep"]) == {"wd=0.001", "wd=0.1"}


def test_few_shot_mean_and_std_match_a_direct_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    feats = features()
    monkeypatch.setattr(lp, "extract_labelled", lambda *a, **k: feats)
    report = lp.linear_probe(nn.Linear(2, 2), None, None, None, shots=[3, 1], seeds=3, seed=10)  # type: ignore[arg-type]
    assert report.params["protocol"] == "fast" and report.params["seeds"] == [10, 11, 12]
    for k in (1, 3):
        runs = []
        for seed in (10, 11, 12):
            idx = balanced_shots(feats.train_y, k, seed)
            z_train, z_test = standardise(feats.train_x[idx].double(), feats.test_x.double())
            weight, bias = fit_logistic(z_train, feats.train_y[idx], NUM_CLASSES, weight_decay=1e-3)
            runs.append(float((predict_logistic(z_test, weight, bias) == feats.test_y).double().mean()))
        point = report.metrics["few_shot"][str(k)]
        assert point["runs"] == runs
        assert point["mean"] == pytest.approx(np.mean(runs), abs=1e-12)
        assert point["std"] == pytest.approx(np.std(runs, ddof=1), abs=1e-12) and point["std"] > 0


def test_few_shot_with_a_minibatch_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    feats = features()
    monkeypatch.setattr(lp, "extract_labelled", lambda *a, **k: feats)
    report = lp.linear_probe(nn.Linear(2, 2), None, None, None, protocol="moco", epochs=3, shots=[2],  # type: ignore[arg-type]
                             seeds=2)
    runs = []
    for seed in (0, 1):
        idx = balanced_shots(feats.train_y, 2, seed)
        settings = resolve_protocol("moco", epochs=3, num_train=idx.numel())
        (fit,) = fit_linear_heads(feats.train_x[idx], feats.train_y[idx], num_classes=NUM_CLASSES, settings=settings,
                                  seed=seed)
        with torch.no_grad():
            runs.append(float((fit.head(feats.test_x).argmax(1) == feats.test_y).double().mean()))
    assert report.metrics["few_shot"]["2"]["runs"] == runs


def test_probe_option_conflicts_are_user_errors() -> None:
    for kwargs, match in [({"protocol": "custom", "shots": [1], "lr": [0.1, 1.0]}, "--shots"), ({"shots": [1], "seeds": 0}, "--seeds"),
                          ({"lr": [0.1, 1.0], "val_fraction": 0.0}, "--val-fraction"),
                          ({"val_fraction": 1.5}, "--val-fraction"), ({"protocol": "simclr"}, "unknown --protocol"),
                          ({"lr": []}, "empty list"), ({"weight_decay": [-1.0]}, "non-negative"),
                          ({"shots": [0]}, "not a positive integer")]:
        with pytest.raises(UserError, match=match):
            lp.resolve_probe(kwargs.pop("protocol", None), **kwargs)


# --- through the CLI ---------------------------------------------------------------------------------------
PIXELS = ["--raw-pixels", "--image-size", "8", "--crop-pct", "1.0"]


def invoke(*args: str | Path):  # noqa: ANN201 - click's Result
    return CliRunner().invoke(app, ["linear-probe", *PIXELS, *(str(a) for a in args)])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--lr", "-0.1"], "--lr values must be finite and positive"),
        (["--lr", ","], "--lr got an empty list"),
        (["--lr", "fast"], "--lr takes numbers separated by commas"),
        (["--protocol", "byol"], "unknown --protocol 'byol'"),
        (["--protocol", "fast", "--epochs", "5"], "does not apply to --protocol fast"),
        (["--shots", "1", "--weight-decay", "0.1,1"], "--shots trains each few-shot probe"),
        (["--shots", "1000"], "fewer than 1000 shots"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(args: list[str], expected: str, synth_data: Path, tmp_path: Path) -> None:
    result = invoke("--data", synth_data, "--out", tmp_path / "probe.json", *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]  # progress lines may come first
    errors = [line for line in lines if line.startswith("error")]
    assert errors == lines[-1:] and expected in errors[0], result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "probe.json").exists()


def test_cli_sweep_and_few_shot_results(synth_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    result = invoke("--data", synth_data, "--protocol", "mae", "--epochs", "3", "--batch-size", "128",
                    "--lr", "0.5", "--lr", "5,50", "--out", out)
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    params, metrics = payload["params"], payload["metrics"]
    assert params["protocol"] == "mae" and params["optimizer"] == "lars" and params["bn_head"] is True
    assert params["lr_sweep"] == [0.5, 5.0, 50.0] and params["lr"] in (0.5, 5.0, 50.0)
    assert params["val_fraction"] == 0.1 and metrics["val_samples"] + metrics["train_samples"] == 600
    assert set(metrics["sweep"]) == {"lr=0.5", "lr=5.0", "lr=50.0"}
    assert metrics["top1"] == metrics["sweep"][f"lr={params['lr']}"]["test_top1"]

    out = tmp_path / "shots.json"
    result = invoke("--data", synth_data, "--shots", "1,2", "--seeds", "2", "--out", out)
    assert result.exit_code == 0, result.output
    few_shot = json.loads(out.read_text())["metrics"]["few_shot"]
    assert set(few_shot) == {"1", "2"} and all(len(point["runs"]) == 2 for point in few_shot.values())
    assert all(math.isclose(point["mean"], sum(point["runs"]) / 2) for point in few_shot.values())
