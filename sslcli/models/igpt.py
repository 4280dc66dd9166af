"""Image GPT (Chen et al., ICML 2020, "Generative Pretraining from Pixels"): a GPT-2 decoder on pixel sequences.

    x = downsample(image, seq_size x seq_size)                  # 32 x 32 in the paper (48, 64 for the larger runs)
    tokens = argmin_k ||x_i - palette_k||^2                      # a 512-colour k-means palette ("9-bit colour")
    h^0 = embed(tokens) + pos;  h^l = block_l(h^(l-1))           # pre-LN blocks, causal (AR) or bidirectional (BERT)
    logits = W_lm layer_norm(h^L);  features = mean_i layer_norm(h^layer)_i   # the linear probe's input (Sec. 3.3)

:class:`ImageGPT` is registered with timm (``igpt_tiny``, ``igpt_s``, ``igpt_m``, ``igpt_l``), so it is an
sslcli encoder like any timm backbone: ``timm.create_model("igpt_s", num_classes=0)`` after ``import sslcli``
rebuilds it (the paper gives widths and depths; head counts are sslcli's choice), and the palette travels in its state dict (buffer ``palette``). Its input is the normalised image
(any size; it is area-downsampled to the sequence grid); its output is the average-pooled, layer-normed output of
block ``feature_layer`` (default: the middle one, where the paper finds the best linear-probe features).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from sslcli.engine.kmeans import assign
from sslcli.models.transformer import Block


def quantize(pixels: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Index ``[...]`` of the nearest palette colour (squared Euclidean) of each pixel ``[..., 3]``."""
    return assign(pixels.reshape(-1, pixels.shape[-1]).float(), palette.float())[0].view(pixels.shape[:-1])


def dequantize(tokens: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """The palette colours ``[..., 3]`` of ``tokens``."""
    return palette[tokens]


def image_to_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> raster-order pixels ``[B, size * size, C]``, area-averaged down to ``size`` x ``size``."""
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images.float(), size=(size, size), mode="area")
    return images.flatten(2).transpose(1, 2)


class ImageGPT(nn.Module):
    """A pre-LN GPT over ``seq_size**2`` palette tokens (vocabulary ``vocab`` plus one start / mask token)."""

    def __init__(self, vocab: int = 512, seq_size: int = 32, width: int = 512, depth: int = 24, heads: int = 8,
                 mlp_ratio: float = 4.0, causal: bool = True, feature_layer: int | None = None, num_classes: int = 0,
                 in_chans: int = 3, **_: Any) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.vocab, self.seq_size, self.width, self.depth, self.causal = vocab, seq_size, width, depth, causal
        self.feature_layer = depth // 2 if feature_layer is None else feature_layer
        self.select_layer(self.feature_layer)
        self.num_features = width
        # The colours tokens stand for, in the normalised input space. Until k-means fits it to data (the igpt
        # method does, before its first epoch), a seeded random palette: a random-init baseline still sees colours.
        palette = torch.rand(vocab, in_chans, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.register_buffer("palette", palette)
        self.start_token = vocab  # the sequence-start token (AR) and the mask token (BERT): one extra embedding
        self.tok_embed = nn.Embedding(vocab + 1, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_size * seq_size, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, causal) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.head = nn.Linear(width, num_classes) if num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2's N(0, 0.02), residual projections scaled by 1/sqrt(2 depth) (the depth-dependent init iGPT takes
        # from the Sparse Transformer), and the logit projection at zero (Sec. 3.4): the first loss is ln(vocab).
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos_embed, std=0.01)
        for block in self.blocks:
            nn.init.normal_(block.proj.weight, std=0.02 / math.sqrt(2 * self.depth))
            nn.init.normal_(block.mlp[2].weight, std=0.02 / math.sqrt(2 * self.depth))
        nn.init.zeros_(self.lm_head.weight)

    def select_layer(self, layer: int) -> None:
        """Pool the output of block ``layer`` (1..depth) as the features ``forward`` returns."""
        if not 1 <= layer <= self.depth:
            raise ValueError(f"layer {layer} is not a block of this {self.depth}-block iGPT; choose 1..{self.depth}")
        self.feature_layer = layer

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, C, H, W]`` -> palette tokens ``[B, seq_size**2]`` in raster order."""
        return quantize(image_to_pixels(images, self.seq_size), self.palette)

    def inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """The sequence the network reads: shifted right behind the start token when causal, else as is."""
        if not self.causal:
            return tokens
        return torch.cat([torch.full_like(tokens[:, :1], self.start_token), tokens[:, :-1]], dim=1)

    def hidden(self, inputs: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """Residual stream ``[B, L, width]`` after the first ``layers`` blocks (all by default)."""
        x = self.tok_embed(inputs) + self.pos_embed[:, : inputs.shape[1]]
        for block in self.blocks[: self.depth if layers is None else layers]:
            x = block(x)
        return x

    def logits(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token (causal) or masked-token (bidirectional) logits ``[B, L, vocab]``, and the final stream."""
        h = self.hidden(inputs)
        return self.lm_head(self.ln_f(h)), h

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        h = self.hidden(self.inputs(self.tokens(images)), self.feature_layer)
        return F.layer_norm(h, (self.width,)).mean(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))


def _create(variant: dict[str, Any], **kwargs: Any) -> ImageGPT:
    kwargs.pop("pretrained", None)  # sslcli never downloads weights; there are none to download
    return ImageGPT(**{**variant, **kwargs})


@register_model
def igpt_tiny(**kwargs: Any) -> ImageGPT:
    """A 4 x 128 iGPT on 16 x 16 sequences, for CPUs and small images (not in the paper)."""
    return _create(dict(width=128, depth=4, heads=4, seq_size=16), **kwargs)


@register_model
def igpt_s(**kwargs: Any) -> ImageGPT:
    """iGPT-S: 24 blocks of width 512, 76M parameters."""
    return _create(dict(width=512, depth=24, heads=8), **kwargs)


@register_model
def igpt_m(**kwargs: Any) -> ImageGPT:
    """iGPT-M: 36 blocks of width 1024, 455M parameters."""
    return _create(dict(width=1024, depth=36, heads=8), **kwargs)


@register_model
def igpt_l(**kwargs: Any) -> ImageGPT:
    """iGPT-L: 48 blocks of width 1536, 1.4B parameters."""
    return _create(dict(width=1536, depth=48, heads=16), **kwargs)
