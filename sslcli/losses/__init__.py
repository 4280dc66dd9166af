"""Losses: small pure functions of tensors (no epochs, globals or process groups)."""

from sslcli.losses.barlow import barlow_twins_loss
from sslcli.losses.chunked import info_nce_chunked
from sslcli.losses.contrastive import in_batch_contrastive, info_nce, nt_xent
from sslcli.losses.dino import dino_loss, update_center
from sslcli.losses.distill import distillation_loss
from sslcli.losses.monitors import collapse_std, distribution_entropy, effective_rank
from sslcli.losses.reconstruction import kl_to_uniform, masked_mse, normalized_patches
from sslcli.losses.regression import byol_loss, negative_cosine
from sslcli.losses.swav import swav_loss
from sslcli.losses.tokens import masked_token_loss

__all__ = ["barlow_twins_loss", "byol_loss", "collapse_std", "dino_loss", "distillation_loss", "distribution_entropy",
           "effective_rank", "in_batch_contrastive", "info_nce", "info_nce_chunked", "kl_to_uniform", "masked_mse", "masked_token_loss",
           "negative_cosine", "normalized_patches", "nt_xent", "swav_loss", "update_center"]
