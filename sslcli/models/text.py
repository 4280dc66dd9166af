"""CLIP's text tower (Radford et al., ICML 2021, "Learning Transferable Visual Models From Natural Language
Supervision", Sec. 2.4):

    x = token_embedding(tokens) + positional_embedding        # [B, L, width], L = context length
    x = blocks(x)                                              # pre-LN, causal self-attention (GPT-2 style)
    t = text_projection(ln_final(x)[arange(B), eot_position])  # the [EOS] token's activation -> [B, embed_dim]

The causal mask (kept, the paper notes, so the tower could be initialised from a language model) also means the
zero padding after [EOS] never reaches the pooled feature.
"""

from __future__ import annotations

import torch
from torch import nn

from sslcli.models.transformer import Block


class TextTransformer(nn.Module):
    """Token ids ``[B, L]`` (``eot`` marks each sequence's end) -> text features ``[B, embed_dim]``."""

    def __init__(self, vocab_size: int, eot: int, *, context_length: int = 77, width: int = 512, layers: int = 12,
                 heads: int = 8, embed_dim: int = 512) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by {heads} heads")
        self.eot, self.context_length = eot, context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(Block(width, heads, 4.0, causal=True) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Linear(width, embed_dim, bias=False)
        self._init_weights(width, layers)

    def _init_weights(self, width: int, layers: int) -> None:
        # CLIP's initialisation (model.py, initialize_parameters): residual projections shrink with depth.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.qkv.weight, std=attn_std)
            nn.init.normal_(block.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp[0].weight, std=fc_std)
            nn.init.normal_(block.mlp[2].weight, std=proj_std)
        nn.init.normal_(self.text_projection.weight, std=width**-0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the context length {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        # The first eot of each row: argmax returns the first maximum.
        eot_position = (tokens == self.eot).int().argmax(dim=1)
        return self.text_projection(self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot_position]))
