"""Per-view encoders for multi-view methods: the backbone's architecture with another input width.

CMC (Tian et al., 2019) gives each view (L, ab, depth, ...) its own encoder of the same
architecture, with as many input channels as the view has, and optionally half the width
(CMC's ``is_half`` ResNet: the paper's split of one network into an L half and an ab half).
"""

from __future__ import annotations

import dataclasses

from sslcli.errors import UserError
from sslcli.models.encoders import Encoder, EncoderSpec

_RESNET_CHANNELS = (64, 128, 256, 512)  # timm ResNet stage widths (planes); CMC's half width is 32..256


def view_spec(spec: EncoderSpec, in_chans: int, width: float = 1.0) -> EncoderSpec:
    """``spec`` for a view of ``in_chans`` channels; ``width`` scales a timm ResNet's stage widths.

    ``width: 0.5`` is CMC's ``is_half`` ResNet (the paper's split of one network into an L half and
    an ab half): the 64-channel stem is kept, the four stages get 32, 64, 128, 256 planes.
    """
    kwargs = dict(spec.timm_kwargs, in_chans=in_chans)
    if width != 1.0:
        if width <= 0:
            raise UserError(f"method_args.width must be positive, got {width}")
        base = kwargs.get("channels", _RESNET_CHANNELS)
        kwargs["channels"] = [max(1, round(c * width)) for c in base]
    return dataclasses.replace(spec, timm_kwargs=kwargs)


def build_view_encoder(spec: EncoderSpec, like: Encoder) -> Encoder:
    """A fresh encoder of ``spec`` that keeps ``like``'s frozen patch embedding, if it has one."""
    try:
        encoder = Encoder(spec)
    except TypeError as err:  # timm models without stage widths reject `channels`
        raise UserError(f"method_args.width != 1 needs a timm ResNet backbone, not '{spec.arch}' ({err})") from None
    if any(not p.requires_grad for p in like.parameters()):  # --freeze-patch-embed applies to every view
        encoder.freeze_patch_embed()
    return encoder
