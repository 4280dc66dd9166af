"""Image GPT (Chen, Radford, Child, Wu, Jun, Luan, Sutskever, ICML 2020, "Generative Pretraining from Pixels").

    palette = kmeans(pixels of the training set, 512)             # once, before the first epoch
    x = quantize(downsample(crop, 32 x 32), palette)              # n = 1024 tokens in raster order
    AR:   L = -sum_i log p(x_i | x_<i)                            # causal attention, inputs shifted behind <start>
    BERT: M ~ 15% of positions;  L = -sum_{i in M} log p(x_i | x_notM)   # bidirectional, <mask> at M

The backbone is the GPT itself (:class:`sslcli.models.igpt.ImageGPT`, ``--arch igpt_s`` / ``igpt_tiny``): its
features are the average-pooled output of one block, the one ``sslcli knn`` / ``linear-probe --layer`` pick.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslcli import distributed as dist
from sslcli.engine.kmeans import kmeans
from sslcli.errors import UserError
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.igpt import ImageGPT, image_to_pixels

OBJECTIVES = ("ar", "bert")


class PixelSample(nn.Module):
    """``count`` pixels ``[B, count * C]`` of each image at the sequence resolution, at seeded random positions:
    k-means on a sample of every image's pixels, not on all ``N x 1024`` of them."""

    def __init__(self, seq_size: int, count: int, seed: int) -> None:
        super().__init__()
        self.seq_size, self.count = seq_size, count
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = image_to_pixels(images, self.seq_size)
        picks = torch.randint(pixels.shape[1], (pixels.shape[0], self.count), generator=self.generator)
        return pixels.gather(1, picks.to(pixels.device)[..., None].expand(-1, -1, pixels.shape[2])).flatten(1)


@register_method("igpt")
class IGPT(Method):
    """Image GPT (Chen et al., 2020): predict palette-quantised pixels autoregressively or BERT-style."""

    def __init__(self, encoder: Encoder, objective: str = "ar", mask_prob: float = 0.15, palette_size: int = 512,
                 resolution: int | None = None, palette_pixels_per_image: int = 64, kmeans_iterations: int = 20,
                 seed: int = 0) -> None:
        if not isinstance(encoder.model, ImageGPT):
            raise UserError(f"igpt trains an Image GPT, not '{encoder.spec.arch}'; pass --arch igpt_s (the paper's "
                            "iGPT-S), igpt_m, igpt_l or igpt_tiny")
        if objective not in OBJECTIVES:
            raise UserError(f"method_args.objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        if not 0 < mask_prob < 1:
            raise UserError(f"method_args.mask_prob must be in (0, 1), got {mask_prob}")
        if palette_size < 2 or (resolution is not None and resolution < 2):
            raise UserError(f"method_args.palette_size and resolution must be at least 2, got {palette_size}, {resolution}")
        # The objective, palette size and sequence resolution shape the GPT: rebuild the architecture's model with them
        # (the exported metadata records them, so evaluation rebuilds the same network).
        model = encoder.model
        wanted = {"causal": objective == "ar", "vocab": palette_size, "seq_size": resolution or model.seq_size}
        if (model.causal, model.vocab, model.seq_size) != tuple(wanted.values()):
            encoder = Encoder(dataclasses.replace(encoder.spec, timm_kwargs={**encoder.spec.timm_kwargs, **wanted}))
        super().__init__(encoder)
        self.objective, self.mask_prob = objective, mask_prob
        self.palette_pixels, self.kmeans_iterations, self.seed = palette_pixels_per_image, kmeans_iterations, seed
        self.register_buffer("palette_fitted", torch.zeros((), dtype=torch.bool))

    @property
    def gpt(self) -> ImageGPT:
        return self.backbone.model

    def before_epoch(self, epoch: int, dataset_features: Callable[[nn.Module], torch.Tensor]) -> list[nn.Parameter]:
        if bool(self.palette_fitted):  # fitted once; a resumed run keeps its checkpoint's palette
            return []
        pixels = dataset_features(PixelSample(self.gpt.seq_size, self.palette_pixels, self.seed))
        pixels = pixels.view(-1, self.gpt.palette.shape[1])
        if pixels.shape[0] < self.gpt.vocab:
            raise UserError(f"a {self.gpt.vocab}-colour palette needs at least as many pixel samples, got "
                            f"{pixels.shape[0]}; raise method_args.palette_pixels_per_image or use more images")
        palette, _ = kmeans(pixels.to(self.gpt.palette.device), self.gpt.vocab, iterations=self.kmeans_iterations,
                            seed=self.seed)
        self.gpt.palette.copy_(dist.broadcast_(palette))  # one palette on every rank
        self.palette_fitted.fill_(True)
        return []

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        tokens = self.gpt.tokens(views[0])
        if self.objective == "ar":
            inputs, predicted = self.gpt.inputs(tokens), torch.ones_like(tokens, dtype=torch.bool)
        else:
            predicted = torch.rand(tokens.shape, device=tokens.device) < self.mask_prob
            predicted[:, 0] |= ~predicted.any(1)  # at least one masked position per sequence
            inputs = tokens.masked_fill(predicted, self.gpt.start_token)
        logits, hidden = self.gpt.logits(inputs)
        # The mean over predicted positions as a weighted mean over all of them: a boolean index would give a
        # data-dependent shape (a graph break when compiled). AR predicts every position anyway.
        weight = predicted.float()
        per_token = F.cross_entropy(logits.float().transpose(1, 2), tokens, reduction="none")  # [B, N]
        loss = (per_token * weight).sum() / weight.sum()
        with torch.no_grad():
            accuracy = ((logits.argmax(-1) == tokens).float() * weight).sum() / weight.sum()
        logs = {"bits_per_token": loss.detach() / torch.log(torch.tensor(2.0)), "token_acc": accuracy}
        return StepOutput(loss, logs, embedding=hidden.mean(1))
