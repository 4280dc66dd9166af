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
TINY = {"arch": "resnet18", "epochs": 1, "batch_size": 64, "num_workers": 0}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_and_exports(name: str, synth_data: Path, tmp_path: Path) -> None:
    cfg = build_config(name, "small", {**TINY, "data": str(synth_data)}, ["log_every=1"])
    run = pretrain(cfg, tmp_path / name, device="cpu")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 600 // 64 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert json.loads((run / "run.json").read_text())["status"] == "finished"

    path = run / "encoder.safetensors"
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    model = timm.create_model(meta["timm_name"], pretrained=False, num_classes=0, **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(load_file(str(path)), strict=True)
    torch.manual_seed(cfg.seed)
    init = create_encoder(cfg.arch).model.state_dict()
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, init[k])]
    assert len(moved) > len(init) // 2, "training did not change the backbone"
    assert meta["method"] == name and meta["image_size"] == "32"
