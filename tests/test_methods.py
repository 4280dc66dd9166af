"""Every registered method, automatically: it trains end to end and its export loads into timm.

A new `@register_method` name gets these tests without writing any; the mechanism of each method is
tested on its own elsewhere (losses, queue, EMA, Shuffle BN, distributed equivalence).
"""

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sslcli.config import build_config
from sslcli.methods import METHODS, get_method
from sslcli.models.encoders import create_encoder
from sslcli.pretrain import pretrain

get_method("simclr")  # populate the registry before parametrisation
TINY = {"epochs": 1, "batch_size": 64, "num_workers": 0}  # on each small recipe's own backbone


# Methods that train on the output of another run.
PREREQUISITES = {"beit": lambda request: [f"method_args.tokenizer={request.getfixturevalue('tokenizer_run')}"]}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_and_exports(name: str, synth_data: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    extra = PREREQUISITES[name](request) if name in PREREQUISITES else []
    cfg = build_config(name, "small", {**TINY, "data": str(synth_data)}, ["log_every=1", *extra])
    run = pretrain(cfg, tmp_path / name, device="cpu")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 600 // 64 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    # every method hands its output embedding to the collapse monitors (StepOutput.embedding)
    assert all(r["embed_std"] > 0 and r["embed_rank"] >= 1 for r in records)
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    if not METHODS[name].has_backbone:  # a tokenizer: its file reloads and training changed it
        from sslcli.models.dvae import DiscreteVAE, load_tokenizer

        tokenizer, meta = load_tokenizer(run)
        torch.manual_seed(cfg.seed)
        init = DiscreteVAE(tokenizer.vocab, tokenizer.code_dim, tuple(tokenizer.widths)).state_dict()
        assert all(not torch.equal(v, init[k]) for k, v in tokenizer.state_dict().items())
        assert meta["image_size"] == str(cfg.augment.eval_size) and not (run / "encoder.safetensors").exists()
        return

    path = run / "encoder.safetensors"
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    model = timm.create_model(meta["timm_name"], pretrained=False, num_classes=0, **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(load_file(str(path)), strict=True)
    torch.manual_seed(cfg.seed)  # a fresh init of the exported architecture (CPC swaps BatchNorm for layer norm)
    init = timm.create_model(meta["timm_name"], pretrained=False, num_classes=0,
                             **json.loads(meta["timm_kwargs"])).state_dict()
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, init[k])]
    assert len(moved) > len(init) // 2, "training did not change the backbone"
    assert meta["method"] == name and meta["image_size"] == str(cfg.augment.eval_size)


def test_moco_v1_and_v2_differ_only_in_head_and_temperature() -> None:
    v1 = get_method("mocov1")(create_encoder("resnet18"), queue_size=16)
    v2 = get_method("mocov2")(create_encoder("resnet18"), queue_size=16, mlp_hidden=64)
    assert [type(m) for m in v1.query[1]] == [torch.nn.Linear]  # linear head
    assert [type(m) for m in v2.query[1]] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert (v1.temperature, v2.temperature) == (0.07, 0.2)


def test_methods_command_lists_every_method_with_a_description() -> None:
    from typer.testing import CliRunner

    from sslcli.cli.app import app
    from sslcli.methods.base import describe_method

    result = CliRunner().invoke(app, ["methods"], terminal_width=200)
    assert result.exit_code == 0
    for name, cls in METHODS.items():
        line = next(row for row in result.output.splitlines() if row.split() and row.split()[0] == name)
        assert len(describe_method(cls)) > 20 and describe_method(cls)[:20] in line
