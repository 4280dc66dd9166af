"""Per-sample normalisation for backbones whose BatchNorm would leak information across a batch.

CPC v2 (Henaff et al., 2020, Sec. 4.1 "LN") replaces every BatchNorm of its ResNet by layer
normalisation: batch statistics couple the patches of one image, which the network can exploit
to bypass the receptive-field constraints of the prediction task.  Layer norm over ``(C, H, W)``
with a per-channel scale and shift is ``GroupNorm(1, C)``, timm's ``"groupnorm1"``.

The swap is a timm argument, not a module surgery: the new spec records ``norm_layer`` in its
``timm_kwargs``, so the exported weights load with
``timm.create_model(name, num_classes=0, norm_layer="groupnorm1")`` like any other export.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from sslcli.errors import UserError
from sslcli.models.encoders import Encoder

LAYER_NORM = "groupnorm1"  # timm's GroupNorm with one group: LayerNorm over (C, H, W), per-channel affine


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def with_layer_norm(encoder: Encoder) -> Encoder:
    """A fresh (randomly initialised) ``encoder`` architecture whose BatchNorms are layer norms.

    A backbone without BatchNorm (a ViT normalises per token already) is returned unchanged.
    """
    if not has_batch_norm(encoder.model):
        return encoder
    spec = dataclasses.replace(encoder.spec, timm_kwargs={**encoder.spec.timm_kwargs, "norm_layer": LAYER_NORM})
    try:
        swapped = Encoder(spec)
    except TypeError:
        swapped = None  # the timm model does not take a norm_layer argument
    if swapped is None or has_batch_norm(swapped.model):
        raise UserError(f"cannot replace the BatchNorm of '{encoder.spec.arch}' by layer norm (timm has no "
                        "norm_layer argument for it); use a ResNet or set method_args.norm=bn")
    return swapped
