"""Losses: small pure functions of tensors (no epochs, globals or process groups)."""

from sslcli.losses.contrastive import in_batch_contrastive, info_nce, nt_xent
from sslcli.losses.distill import distillation_loss
from sslcli.losses.monitors import collapse_std

__all__ = ["collapse_std", "distillation_loss", "in_batch_contrastive", "info_nce", "nt_xent"]
