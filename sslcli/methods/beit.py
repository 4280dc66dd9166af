"""BEiT (Bao, Dong, Piao, Wei, 2022, "BEiT: BERT Pre-Training of Image Transformers"), stage 2.

The official ``forward`` of ``modeling_pretrain.py`` (Sec. 2.3):

    tokens = tokenizer(x)                          # a visual word per patch, from the stage-1 dVAE (frozen)
    mask = blockwise_mask(~40% of the patches)     # blocks of >= 16 patches (Algorithm 1)
    h = ViT(patches with [M] at the masked ones)   # a learned mask embedding, then positions and blocks
    L = cross_entropy(lm_head(h[mask]), tokens[mask])

The tokenizer comes from ``sslcli pretrain dvae`` (``method_args.tokenizer``: its run directory or
``tokenizer.safetensors``); it sees the same crop, resized to its grid and re-normalised.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslcli.augment import AugmentConfig
from sslcli.engine.masking import blockwise_mask
from sslcli.errors import UserError
from sslcli.losses import masked_token_loss
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.beit import check_maskable, forward_with_mask_token
from sslcli.models.dvae import load_tokenizer
from sslcli.models.encoders import Encoder


@register_method("beit")
class BEiT(Method):
    """BEiT (Bao et al., 2022): predict the dVAE visual token of each blockwise-masked patch of a ViT."""

    def __init__(self, encoder: Encoder, augment: AugmentConfig, tokenizer: str = "", mask_ratio: float = 0.4,
                 min_block: int = 16) -> None:
        super().__init__(encoder)
        vit = check_maskable(encoder.model, f"'{encoder.spec.arch}'")
        if not tokenizer:
            raise UserError("beit predicts the tokens of a trained tokenizer: run `sslcli pretrain dvae --out RUN` "
                            "first, then pass --set method_args.tokenizer=RUN")
        self.tokenizer, meta = load_tokenizer(tokenizer)
        self.tokenizer.requires_grad_(False)
        self.grid = tuple(vit.patch_embed.grid_size)
        self.tokenizer_size = (self.grid[0] * self.tokenizer.stride, self.grid[1] * self.tokenizer.stride)
        # pixels: images * std + mean; the tokenizer's input: (pixels - mean_t) / std_t
        scale = torch.tensor(augment.std) / torch.tensor(json.loads(meta["std"]))
        shift = (torch.tensor(augment.mean) - torch.tensor(json.loads(meta["mean"]))) / torch.tensor(json.loads(meta["std"]))
        self.register_buffer("to_tokenizer", torch.stack([scale, shift])[:, :, None, None], persistent=False)
        self.num_masked = int(round(mask_ratio * self.grid[0] * self.grid[1]))
        if not 0 < self.num_masked < self.grid[0] * self.grid[1]:
            raise UserError(f"mask_ratio {mask_ratio} masks {self.num_masked} of {self.grid[0] * self.grid[1]} patches; "
                            "pick a ratio that masks some but not all")
        self.min_block = min_block
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.dim))
        self.head = nn.Linear(encoder.dim, self.tokenizer.vocab)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True) -> BEiT:
        super().train(mode)
        self.tokenizer.eval()  # frozen: its layers never switch to training behaviour
        return self

    @torch.no_grad()
    def visual_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` the tokenizer's word for each patch of ``images`` (normalised model inputs)."""
        x = images.float() * self.to_tokenizer[0] + self.to_tokenizer[1]
        if tuple(x.shape[-2:]) != self.tokenizer_size:
            x = F.interpolate(x, size=self.tokenizer_size, mode="bilinear", antialias=True, align_corners=False)
        return self.tokenizer.tokens(x).flatten(1)

    @torch.compiler.disable  # Python loops on the host: a compiled step calls it as it is
    def sample_masks(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, N]`` bool blockwise masks, drawn from the global torch RNG (so seeded runs repeat), and the
        ``[M]`` flat indices of their True entries: found on the host, they cost the device no sync."""
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        masks = torch.stack([blockwise_mask(self.grid, self.num_masked, min_block=self.min_block, generator=generator)
                             for _ in range(batch)]).flatten(1)
        where = masks.flatten().nonzero().squeeze(1)
        torch._dynamo.maybe_mark_dynamic(where, 0)  # M varies by batch: compiled, trace it symbolic from the start
        return masks, where

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        images = views[0]
        tokens = self.visual_tokens(images)
        mask, where = (t.to(images.device, non_blocking=True) for t in self.sample_masks(images.shape[0]))
        h = forward_with_mask_token(self.backbone.model, images, mask, self.mask_token)
        logits = self.head(h[:, 1:].flatten(0, 1).index_select(0, where))  # the masked positions only
        loss = masked_token_loss(logits, tokens, where)
        accuracy = (logits.detach().argmax(-1) == tokens.flatten()[where]).float().mean()
        return StepOutput(loss, {"token_acc": accuracy, "mask_frac": mask.float().mean()}, embedding=h[:, 0])

    def describe(self) -> dict[str, str]:
        return {"tokenizer": f"{self.tokenizer.vocab} words on {self.tokenizer_size[0]}-px inputs",
                "masking": f"blockwise, {self.num_masked} of {self.grid[0]}x{self.grid[1]} patches, "
                           f"blocks >= {self.min_block}"}
