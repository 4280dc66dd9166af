"""CMC's evaluation features: the L and ab encoders of a CMC run, concatenated (Tian et al., 2019, Sec. 4).

One timm-loadable file holds one backbone, so ``sslcli export`` ships the L encoder; this module
rebuilds both from a run's checkpoint for the paper's protocol, from Python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslcli.augment import eval_transform
from sslcli.colorspace import LAB_MEAN, LAB_STD
from sslcli.errors import UserError
from sslcli.models.encoders import Encoder


class ConcatLabEncoder(nn.Module):
    """CMC's evaluation features: the L and ab encoders' pooled features of a normalised Lab image, concatenated.

    Input ``[B, 3, H, W]`` in the ``lab`` input space normalised with ``LAB_MEAN`` / ``LAB_STD``; output
    ``[B, dim_L + dim_ab]``, each half L2-normalised so that neither view outweighs the other in kNN.
    """

    def __init__(self, l_encoder: Encoder, ab_encoder: Encoder) -> None:
        super().__init__()
        self.l_encoder, self.ab_encoder = l_encoder, ab_encoder
        self.dim = l_encoder.dim + ab_encoder.dim

    def forward(self, lab: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.normalize(self.l_encoder(lab[:, :1]), dim=1),
                          F.normalize(self.ab_encoder(lab[:, 1:]), dim=1)], dim=1)


def concat_encoder(run: Path | str) -> tuple[ConcatLabEncoder, Any]:
    """The L+ab encoder of a CMC run (directory or checkpoint file) and its evaluation transform.

    ``knn_evaluate(encoder, train, test, transform)`` / ``linear_probe(...)`` then evaluate CMC's
    concatenated features (the paper's protocol) instead of the exported L encoder's alone.
    """
    from sslcli.config import PretrainConfig, from_dict
    from sslcli.engine import checkpoint
    from sslcli.export import state_to_tensor_dict
    from sslcli.methods.cmc import CMC
    from sslcli.models.encoders import resolve_arch

    run = Path(run)
    ckpt = run if run.is_file() else checkpoint.latest(run / "checkpoints")
    if ckpt is None:
        raise UserError(f"'{run}' has no checkpoints; train it with `sslcli pretrain cmc ... --out {run}` first")
    state = checkpoint.load(ckpt)
    cfg: PretrainConfig = from_dict(PretrainConfig, state["config"])
    if cfg.method != "cmc":
        raise UserError(f"'{run}' is a {cfg.method} run, not cmc")
    method = CMC(Encoder(resolve_arch(cfg.arch, img_size=cfg.augment.eval_size)), num_samples=1, augment=cfg.augment,
                 **cfg.method_args)
    method.backbone.load_state_dict(state_to_tensor_dict(state["model"], "backbone."), strict=True)
    method.view_encoders[0].load_state_dict(state_to_tensor_dict(state["model"], "view_encoders.0."), strict=True)
    encoder = ConcatLabEncoder(method.backbone, method.view_encoders[0])
    transform = eval_transform(cfg.augment.eval_size, cfg.augment.eval_crop_pct, LAB_MEAN, LAB_STD, input_space="lab")
    return encoder, transform
