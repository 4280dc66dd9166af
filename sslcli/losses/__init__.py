"""Losses: small pure functions of tensors (no epochs, globals or process groups)."""

from sslcli.losses.contrastive import info_nce, nt_xent

__all__ = ["info_nce", "nt_xent"]
