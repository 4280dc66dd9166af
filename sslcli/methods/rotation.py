"""Rotation prediction (Gidaris, Singh, Komodakis, ICLR 2018, "Unsupervised Representation Learning by
Predicting Image Rotations"), a classic pretext task: by how many quarter turns was the image rotated?

    x_k = rot90(x, k),  k = 0, 1, 2, 3                       # all four rotations of every image in the batch
    L = mean_k cross_entropy(classifier(f(x_k)), k)

The paper feeds all four rotated copies of each image together (Sec. 3.2: better than one random rotation per
image), so a batch of B images is 4B inputs. It only works on images with an upright orientation: on data where
objects appear at every angle there is nothing to predict (`sslcli data synth --max-rotation 20` makes such data
from the embedded shapes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sslcli.engine.device import laid_out_for
from sslcli.errors import UserError
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.heads import build_mlp

ROTATIONS = 4


def rotations(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, C, S, S]`` -> the four rotations ``[4B, C, S, S]`` (k quarter turns counter-clockwise, block k) and
    their labels ``[4B]``."""
    if images.shape[-1] != images.shape[-2]:
        raise UserError(f"rotation needs square crops, got {images.shape[-2]} x {images.shape[-1]}; use ratio: [1, 1]")
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


@register_method("rotation")
class Rotation(Method):
    """RotNet (Gidaris et al., 2018): classify which of four rotations an image was given."""

    def __init__(self, encoder: Encoder, hidden: int = 0) -> None:
        super().__init__(encoder)
        # RotNet classifies from the last conv block through a small head; `hidden: 0` is a linear classifier.
        layers = [(hidden, "bn", "relu")] if hidden else []
        self.classifier = build_mlp(encoder.dim, [*layers, (ROTATIONS, None, None)])

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        rotated, labels = rotations(views[0])
        features = self.backbone(laid_out_for(rotated, self.backbone))
        logits = self.classifier(features)
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        return StepOutput(F.cross_entropy(logits.float(), labels), {"rotation_acc": accuracy},
                          embedding=features[: views[0].shape[0]])
