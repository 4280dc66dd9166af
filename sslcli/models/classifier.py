"""A supervised classifier on a pretrained backbone: what ``finetune`` trains and ``distill`` teaches.

``fc(projector(backbone(x)))``: the projector is empty, or SimCLR v2's kept first projector layers.
Saved as one safetensors file whose header records the backbone (timm name and kwargs), the
projector's layer list, the classes and the preprocessing, so :func:`load_classifier` rebuilds it
without pickles or the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from sslcli.models.encoders import Encoder, EncoderSpec
from sslcli.models.heads import build_mlp, describe_layers
from sslcli.weights_file import read_header, write_weights

FORMAT = "sslcli-classifier/1"


class Classifier(nn.Module):
    def __init__(self, backbone: Encoder, num_classes: int, projector: nn.Sequential | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector if projector is not None else nn.Sequential()
        dim = next((m.out_features for m in reversed(self.projector) if isinstance(m, nn.Linear)), backbone.dim)
        self.fc = nn.Linear(dim, num_classes)
        # SimCLR v2 starts the new head at zero; any small init works, zero makes the start reproducible.
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.projector(self.backbone(x)))


def save_classifier(model: Classifier, path: Path, metadata: dict[str, str]) -> Path:
    """Writes ``model`` atomically; ``metadata`` adds preprocessing, classes and provenance."""
    spec = model.backbone.spec
    meta = {**metadata, "format": FORMAT, "arch": spec.arch, "timm_name": spec.timm_name,
            "timm_kwargs": json.dumps(spec.timm_kwargs), "num_classes": str(model.fc.out_features),
            "projector": json.dumps(describe_layers(model.projector)) if len(model.projector) else "[]"}
    return write_weights(model.state_dict(), path, meta)


def load_classifier(path: Path) -> tuple[Classifier, dict[str, str]]:
    """The classifier saved at ``path`` (a file or a directory holding ``classifier.safetensors``)."""
    path = path / "classifier.safetensors" if path.is_dir() else path
    meta = read_header(path, FORMAT, "is not an sslcli classifier; make one with `sslcli finetune SOURCE --out DIR`")
    backbone = Encoder(EncoderSpec(meta["arch"], meta["timm_name"], json.loads(meta["timm_kwargs"])))
    layers = [tuple(layer) for layer in json.loads(meta["projector"])]
    projector = build_mlp(backbone.dim, layers) if layers else None
    model = Classifier(backbone, int(meta["num_classes"]), projector)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model, meta
