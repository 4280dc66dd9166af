"""CPC's InfoNCE over a grid of patches: predict the patch ``k`` rows below, other patches are negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslcli.losses.float32 import float32_loss


@float32_loss
def cpc_logits(preds: torch.Tensor, targets: torch.Tensor, k: int, keys: torch.Tensor | None = None,
               offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the row-offset-``k`` predictions against every target patch, and each positive's index.

    The prediction ``preds[b, i, j]`` (made from the context ``c_{i,j}``) is scored against all target
    patches; its positive is ``targets[b, i + k, j]``.  Rows ``i >= G - k`` have nothing ``k`` rows
    below and make no prediction.

    Shapes: ``preds``, ``targets`` ``[B, G, W, D]`` (rows ``G`` along the prediction direction);
    ``keys`` ``[N, D]`` is every target patch of the global batch, flattened in ``(b, i, j)`` order
    (default: ``targets`` of this rank), with this rank's patches at ``offset : offset + B G W``.
    Returns ``logits`` ``[B (G - k) W, N]`` (float32) and ``labels`` ``[B (G - k) W]``.
    """
    b, g, w, d = targets.shape
    if not 0 < k < g:
        raise ValueError(f"prediction offset {k} needs a grid of more than {k} rows, got {g}")
    queries = preds[:, : g - k].reshape(-1, d).float()
    keys = targets.reshape(-1, d) if keys is None else keys
    logits = queries @ keys.float().T
    dev = targets.device
    bi = torch.arange(b, device=dev)[:, None, None]
    ii = torch.arange(g - k, device=dev)[None, :, None]
    jj = torch.arange(w, device=dev)[None, None, :]
    labels = offset + ((bi * g + ii + k) * w + jj).reshape(-1)
    return logits, labels


@float32_loss
def cpc_info_nce(preds: torch.Tensor, targets: torch.Tensor, k: int, keys: torch.Tensor | None = None,
                 offset: int = 0) -> torch.Tensor:
    """InfoNCE of CPC for one offset ``k`` (van den Oord et al., 2018, Eq. 4; Henaff et al., 2020, Eq. 2).

    ``L_k = -mean_{b,i,j} log( exp(p_{b,i,j} . z_{b,i+k,j}) / sum_l exp(p_{b,i,j} . z_l) )``

    with ``p = W_k c`` the prediction and ``z_l`` every target patch of the batch: the other positions
    of the same image and all patches of the other images are the negatives (A.2's pseudo-code).
    No normalisation or temperature: the scores are plain dot products (A.2 scales ``p`` by 0.1
    before this).  Shapes as :func:`cpc_logits`.
    """
    logits, labels = cpc_logits(preds, targets, k, keys, offset)
    return F.cross_entropy(logits, labels)
