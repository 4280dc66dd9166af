"""Pretraining must learn: SimCLR features beat a random-init encoder on held-out data.

The one test here trains for real (about 1.5-2 minutes on 2 CPU cores); it asserts the margin.
"""

from pathlib import Path

import pytest

from sslcli.config import build_config
from sslcli.data.reader import resolve_source
from sslcli.data.synth import generate_synthetic
from sslcli.evaluation import knn_evaluate, resolve_encoder
from sslcli.pretrain import pretrain


def knn_top1(source: str | None, data: Path, **kwargs: object) -> float:
    encoder, info = resolve_encoder(source, image_size=32 if source is None else None, crop_pct=1.0, **kwargs)
    result = knn_evaluate(encoder, resolve_source(data, "train"), resolve_source(data, "test"), info.transform(),
                          k=20, temperature=0.07)
    return result["top1"]


@pytest.mark.slow
def test_simclr_beats_random_init_on_held_out_data(tmp_path: Path) -> None:
    data = tmp_path / "shapes"
    generate_synthetic(data, train=3000, test=1000, size=64, seed=1)
    cfg = build_config("simclr", "small", {"data": str(data), "epochs": 8})
    run = pretrain(cfg, tmp_path / "simclr", device="cpu")
    random_top1 = knn_top1(None, data, arch="resnet18", random_init=True)
    simclr_top1 = knn_top1(str(run), data, arch=None, random_init=False)
    print(f"kNN top-1: random init {random_top1:.3f}, SimCLR {simclr_top1:.3f}")
    assert random_top1 < 0.16  # 10 balanced classes: chance is 0.10
    assert simclr_top1 > random_top1 + 0.06
