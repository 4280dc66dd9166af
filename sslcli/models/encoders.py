"""Backbones are timm models created by name with ``pretrained=False`` and ``num_classes=0``.

Short aliases map to a timm name plus keyword arguments.  Every alias is plain timm: the
exported weights load with ``timm.create_model(timm_name, num_classes=0, **timm_kwargs)``
and ``load_state_dict(strict=True)``; both values are written into the export metadata.
Small-input variants (for the 32-64 px embedded data) are ViTs with small patches; ResNets
need no variant because their global pool accepts any input size.  Image GPT (``igpt_*``) is
sslcli's own model, registered with timm by :mod:`sslcli.models.igpt`: loading it in timm needs
``import sslcli`` first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from sslcli.errors import UserError, suggest
from sslcli.models import igpt  # noqa: F401 - registers sslcli's own timm models (igpt_*) by name

# alias -> (timm name, extra timm kwargs)
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet18": ("resnet18", {}),
    "resnet34": ("resnet34", {}),
    "resnet50": ("resnet50", {}),
    "resnet101": ("resnet101", {}),
    "resnet152": ("resnet152", {}),
    "resnet50w2": ("wide_resnet50_2", {}),
    "regnety_16gf": ("regnety_160", {}),
    "vit_tiny": ("vit_tiny_patch16_224", {}),
    "vit_s16": ("vit_small_patch16_224", {}),
    "vit_s8": ("vit_small_patch8_224", {}),
    "vit_b16": ("vit_base_patch16_224", {}),
    "vit_b8": ("vit_base_patch8_224", {}),
    "vit_l16": ("vit_large_patch16_224", {}),
    "vit_h14": ("vit_huge_patch14_224", {}),
    # small-input variants: 8x8 token grids at 32 px (p4) and 64 px (p8)
    "vit_tiny_p4": ("vit_tiny_patch16_224", {"patch_size": 4}),
    "vit_tiny_p8": ("vit_tiny_patch16_224", {"patch_size": 8}),
    "vit_s_p4": ("vit_small_patch16_224", {"patch_size": 4}),
    "vit_s_p8": ("vit_small_patch16_224", {"patch_size": 8}),
    # dilated last stage (output stride 16): a 2 x 2 feature map at 32 px, for dense methods (densecl)
    "resnet18_os16": ("resnet18", {"output_stride": 16}),
}


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild a backbone, with or without sslcli."""

    arch: str
    timm_name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    def create(self) -> nn.Module:
        return timm.create_model(self.timm_name, pretrained=False, num_classes=0, **self.timm_kwargs)


def resolve_arch(arch: str, img_size: int | None = None, *, any_size: bool = False) -> EncoderSpec:
    """Maps an alias or any timm model name to an :class:`EncoderSpec`.

    Models whose timm config declares a fixed input size (ViT, Swin, ...) are built for
    ``img_size`` so their positional embeddings match the crops they will see.  ``any_size``
    (multi-crop: 96-px local crops next to 224-px global ones) also sets timm's
    ``dynamic_img_size``, which interpolates the positional embeddings to each input's patch
    grid, as DINO's ``interpolate_pos_encoding`` does; the weights are the same either way.
    """
    if arch in ALIASES:
        timm_name, kwargs = ALIASES[arch]
        kwargs = dict(kwargs)
    elif timm.is_model(arch):
        timm_name, kwargs = arch, {}
    else:
        raise UserError(
            f"unknown architecture '{arch}'{suggest(arch, list(ALIASES) + timm.list_models())}; "
            "see `sslcli pretrain --help` for aliases, or pass any timm model name"
        )
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if img_size is not None and cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = img_size
        if any_size:
            kwargs["dynamic_img_size"] = True
    return EncoderSpec(arch=arch, timm_name=timm_name, timm_kwargs=kwargs)


class Encoder(nn.Module):
    """A timm backbone returning pooled features ``h`` of shape ``[B, dim]``."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = spec.create()
        self.dim: int = self.model.num_features
        self.level: int | None = None  # select_layer's feature level of a timm backbone; None: the pooled output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.level is None:
            return self.model(x)
        # timm's feature levels ([B, C, H, W], a ViT's patch tokens laid out as a grid), average-pooled
        return self.model.forward_intermediates(x, indices=[self.level - 1], intermediates_only=True)[0].mean((-2, -1))

    def freeze_patch_embed(self) -> None:
        """Keeps the random-init patch projection fixed (MoCo v3, Sec. 4.2: stabilises ViT training).

        Frozen parameters leave the optimiser, so they stay bit-identical through training.
        """
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is None:
            raise UserError(f"--freeze-patch-embed needs a ViT-style backbone with a patch embedding; "
                            f"'{self.spec.arch}' has none (try --arch vit_s16)")
        for p in patch_embed.parameters():
            p.requires_grad_(False)

    def select_layer(self, layer: int) -> None:
        """Average-pooled features of level ``layer`` instead of the encoder's output: the linear probe on
        intermediate layers (iGPT's middle block; the conv stages on which pretext tasks such as jigsaw are
        evaluated, Goyal et al. 2019).  Image GPT picks its block itself; other timm backbones count the levels
        of their ``feature_info`` from 1 (a ResNet's stem and four stages, a ViT's blocks)."""
        select = getattr(self.model, "select_layer", None)
        if select is not None:
            try:
                select(layer)
            except ValueError as err:
                raise UserError(f"--layer {layer}: {err}") from None
            return
        levels = len(getattr(self.model, "feature_info", None) or [])
        if not levels or not hasattr(self.model, "forward_intermediates"):
            raise UserError(f"{self.spec.arch} has no selectable feature layer (timm gives it no "
                            "forward_intermediates); drop --layer")
        if not 1 <= layer <= levels:
            names = ", ".join(f"{i + 1} {info['module']}" for i, info in enumerate(self.model.feature_info))
            raise UserError(f"--layer {layer}: {self.spec.arch} has feature levels 1..{levels} ({names})")
        self.level = layer
        self.dim = self.model.feature_info[layer - 1]["num_chs"]

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features (``[B, C, H, W]`` for CNNs, ``[B, T, C]`` for ViTs)."""
        return self.model.forward_features(x)


def create_encoder(arch: str, img_size: int | None = None, *, any_size: bool = False) -> Encoder:
    spec = resolve_arch(arch, img_size, any_size=any_size)
    try:
        return Encoder(spec)
    except TypeError as err:  # a fixed-size model that timm cannot interpolate (no dynamic_img_size)
        if "dynamic_img_size" not in str(err):
            raise
        raise UserError(f"{arch} takes {img_size}-px inputs only, but the views have several sizes; "
                        "use one view size or a ViT") from None
