"""SimCLR v2: the 3-layer projector, the MoCo-style memory, keeping projector layers, label subsets,
and the semi-supervised pipeline (pretrain -> subset -> finetune --keep-proj-layers 1 -> distill)."""

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from sslcli.cli.app import app
from sslcli.data.formats import iter_tar_samples
from sslcli.data.reader import resolve_source
from sslcli.data.subset import balanced_subset
from sslcli.errors import UserError
from sslcli.export import kept_projector, load_projector, projector_path, save_projector
from sslcli.methods import get_method
from sslcli.models.classifier import load_classifier
from sslcli.models.encoders import create_encoder
from sslcli.models.heads import describe_layers

runner = CliRunner()


def _v2(**kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return get_method("simclrv2")(create_encoder("resnet18"), **kwargs)


def test_projector_is_three_layers_as_wide_as_the_backbone() -> None:
    method = _v2(memory_size=0)
    assert describe_layers(method.projector) == [(512, "bn", "relu"), (512, "bn", "relu"), (128, "bn", None)]
    assert method.memory is None and method.memory_net is None


def test_memory_enqueues_momentum_keys_of_both_views_and_moves_by_ema() -> None:
    method = _v2(memory_size=32, memory_momentum=0.9)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    method.memory_net.train()
    with torch.no_grad():
        expected = nn.functional.normalize(method.memory_net(torch.cat([x1, x2])), dim=1)
    out = method([x1, x2], {})
    assert int(method.memory.ptr) == 8
    assert torch.allclose(method.memory.keys[:8], expected, atol=1e-5)
    # The memory network is out of the optimiser's reach and follows theta_m <- 0.9 theta_m + 0.1 theta.
    assert all(not p.requires_grad for p in method.memory_net.parameters())
    out.loss.backward()
    online = dict(nn.Sequential(method.backbone, method.projector).named_parameters())
    with torch.no_grad():
        for p in online.values():
            p.add_(1.0)
    before = {k: p.detach().clone() for k, p in method.memory_net.named_parameters()}
    method.after_step(0.5)
    for name, p in method.memory_net.named_parameters():
        assert torch.allclose(p, 0.9 * before[name] + 0.1 * online[name].detach(), atol=1e-6)


def test_kept_projector_shares_the_first_blocks_and_round_trips(tmp_path: Path) -> None:
    method = _v2(memory_size=0)
    kept = kept_projector(method.projector, 1)
    assert [type(m) for m in kept] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] and kept[0] is method.projector[0]
    assert len(kept_projector(method.projector, 3)) == len(method.projector)
    with pytest.raises(UserError, match="1..3"):
        kept_projector(method.projector, 4)
    kept[1].running_mean.normal_()  # non-trivial buffers must travel too
    path = save_projector(kept, 512, tmp_path / "p.safetensors")
    loaded = load_projector(path).eval()
    x = torch.randn(5, 512)
    assert torch.equal(loaded(x), kept.eval()(x))


def test_balanced_subset_is_per_class_seeded_and_nested() -> None:
    labels = np.repeat(np.arange(4), [100, 50, 200, 10])
    ten = balanced_subset(labels, 0.1, seed=3)
    assert np.bincount(labels[ten]).tolist() == [10, 5, 20, 1]
    assert np.array_equal(ten, balanced_subset(labels, 0.1, seed=3))
    assert not np.array_equal(ten, balanced_subset(labels, 0.1, seed=4))
    one = balanced_subset(labels, 0.01, seed=3)
    assert np.bincount(labels[one], minlength=4).tolist() == [1, 1, 2, 1]  # at least one per class
    assert set(one) <= set(ten)
    with pytest.raises(UserError):
        balanced_subset(labels, 0.0, seed=0)
    with pytest.raises(UserError):
        balanced_subset(np.array([0, -1]), 0.5, seed=0)


def test_data_subset_writes_a_balanced_split_and_links_the_rest(synth_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub"
    result = runner.invoke(app, ["data", "subset", str(synth_data), str(out), "--fraction", "0.1", "--seed", "1"])
    assert result.exit_code == 0, result.output
    train, full = resolve_source(out, "train"), resolve_source(synth_data, "train")
    assert train.num_samples == 60 and train.classes == full.classes
    assert resolve_source(out, "test").num_samples == resolve_source(synth_data, "test").num_samples
    # Every sample keeps its fields, extras included; idx is renumbered and the original kept as src_idx.
    originals = {int(f["idx"]): f for shard in train_shards(synth_data) for _, f in iter_tar_samples(shard)}
    for shard in train_shards(out):
        for _, fields in iter_tar_samples(shard):
            source = originals[int(fields["src_idx"])]
            assert {k: v for k, v in fields.items() if k not in ("idx", "src_idx")} == \
                {k: v for k, v in source.items() if k != "idx"}
    again = runner.invoke(app, ["data", "subset", str(synth_data), str(out), "--fraction", "0.1"])
    assert again.exit_code == 2 and "--overwrite" in again.output


def train_shards(root: Path) -> list[Path]:
    return sorted(root.glob("train-*.tar"))


@pytest.mark.slow
def test_semi_supervised_pipeline_end_to_end(synth_data: Path, tmp_path: Path) -> None:
    """Pretrain -> 10% labels -> fine-tune from the first projector layer -> distil, all through the CLI."""
    run, sub = tmp_path / "run", tmp_path / "sub"
    steps = [
        ["pretrain", "simclrv2", "--recipe", "small", "--data", str(synth_data), "--out", str(run), "--epochs", "1",
         "--batch-size", "64", "--set", "method_args.memory_size=256"],
        ["data", "subset", str(synth_data), str(sub), "--fraction", "0.1"],
        ["export", str(run), "--out", str(tmp_path / "enc.safetensors"), "--keep-proj-layers", "1"],
        ["finetune", str(tmp_path / "enc.safetensors"), "--data", str(sub), "--keep-proj-layers", "1", "--epochs", "2",
         "--batch-size", "32", "--out", str(tmp_path / "teacher")],
        ["distill", str(tmp_path / "teacher"), "--data", str(synth_data), "--epochs", "1", "--init", str(run),
         "--out", str(tmp_path / "student")],
    ]
    for args in steps:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)

    # The export stays a plain timm backbone; the kept layer travels beside it.
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    model.load_state_dict(load_file(str(tmp_path / "enc.safetensors")), strict=True)
    assert projector_path(tmp_path / "enc.safetensors").is_file()

    teacher, meta = load_classifier(tmp_path / "teacher")
    assert [type(m) for m in teacher.projector] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert teacher.fc.in_features == 512 and json.loads(meta["classes"]) == resolve_source(sub, "train").classes
    teacher_results = json.loads((tmp_path / "teacher" / "results.json").read_text())
    assert teacher_results["params"]["keep_proj_layers"] == 1 and teacher_results["params"]["train"]["num_samples"] == 60
    student, _ = load_classifier(tmp_path / "student")
    assert len(student.projector) == 0 and student.fc.out_features == 10
    student_results = json.loads((tmp_path / "student" / "results.json").read_text())
    assert student_results["command"] == "distill" and 0 <= student_results["metrics"]["top1"] <= 1


def test_keep_proj_layers_errors(synth_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "mocov3", "--recipe", "small", "--data", str(synth_data), "--out",
                                 str(run), "--epochs", "1", "--batch-size", "64", "--arch", "resnet18"])
    assert result.exit_code == 0, result.output
    bad = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "e.safetensors"), "--keep-proj-layers", "1"])
    assert bad.exit_code == 2 and "no projector" in bad.output
    assert not (tmp_path / "e.safetensors").exists()
