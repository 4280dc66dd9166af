"""CLIP's symmetric image-text contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslcli.losses.float32 import float32_loss


@float32_loss
def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float, *,
              image_keys: torch.Tensor | None = None, text_keys: torch.Tensor | None = None,
              offset: int = 0) -> torch.Tensor:
    """Symmetric cross-entropy over image-text similarities (Radford et al., 2021, Fig. 3):

        logits = s * I T^T                       # s = exp(t), the learned logit scale
        L = (CE(logits, arange(N)) + CE(logits^T, arange(N))) / 2

    Rows are L2-normalised embeddings.  ``image`` and ``text`` ``[n, D]`` are the rows this call scores
    (queries); ``image_keys`` and ``text_keys`` ``[N, D]`` the candidates they are scored against
    (default: the queries themselves, the full N x N matrix), with query ``i``'s pair at ``offset + i``.
    open_clip's ``local_loss`` is this with this rank's rows as queries and the gathered global batch
    as keys: ``n x N`` logits per rank instead of ``N x N``, and the same gradient once summed over ranks.
    Computed in float32 whatever the autocast dtype.
    """
    image_keys = image if image_keys is None else image_keys
    text_keys = text if text_keys is None else text_keys
    labels = torch.arange(image.shape[0], device=image.device) + offset
    image_to_text = logit_scale * image.float() @ text_keys.float().T
    text_to_image = logit_scale * text.float() @ image_keys.float().T
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels)) / 2
