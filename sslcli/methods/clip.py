"""CLIP (Radford et al., ICML 2021, "Learning Transferable Visual Models From Natural Language Supervision").

Fig. 3 of the paper, with negatives gathered across ranks:

    I_e = l2_normalize(image_encoder(x) @ W_i)        # any timm backbone, linear projection (no bias)
    T_e = l2_normalize(text_encoder(tokens) @ W_t)    # Transformer, [EOS] token's feature
    logits = exp(t) * I_e @ T_e^T                     # t learned, exp(t) starts at 1 / 0.07, clipped at 100
    L = (CE(logits, arange(N)) + CE(logits^T, arange(N))) / 2

The captions are the shards' ``txt`` fields.  Their byte-level BPE tokenizer is learnt from the training
captions before the first step (no download) and lives in the state dict (buffer ``merges``), so a run's
checkpoint carries it and ``sslcli zero-shot clip`` tokenizes class prompts exactly as training did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslcli import distributed as dist
from sslcli.errors import UserError
from sslcli.losses.clip import clip_loss
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.text import TextTransformer
from sslcli.models.tokenizer import BPETokenizer

SPECIAL_TOKENS = 258  # 256 byte tokens + start and end of text: the ids that are not merges


@register_method("clip")
class CLIP(Method):
    """CLIP (Radford et al., 2021): contrastive image-text pretraining with a learned temperature."""

    def __init__(self, encoder: Encoder, embed_dim: int = 512, vocab_size: int = 49408, context_length: int = 77,
                 text_width: int = 512, text_layers: int = 12, text_heads: int = 8, init_temperature: float = 0.07,
                 max_logit_scale: float = 100.0, local_loss: bool = False, tokenizer_captions: int = 1_000_000,
                 captions: Callable[[], Iterable[str]] | None = None) -> None:
        super().__init__(encoder)
        if vocab_size <= SPECIAL_TOKENS:
            raise UserError(f"method_args.vocab_size must exceed {SPECIAL_TOKENS} (the byte and special tokens), "
                            f"got {vocab_size}")
        if not (init_temperature > 0 and 1 / init_temperature <= max_logit_scale):
            raise UserError(f"method_args.init_temperature {init_temperature} must be positive with 1 / temperature "
                            f"<= max_logit_scale ({max_logit_scale})")
        self.local_loss, self.max_logit_scale, self.context_length = local_loss, max_logit_scale, context_length
        self.image_projection = nn.Linear(encoder.dim, embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=encoder.dim**-0.5)
        self.text = TextTransformer(vocab_size, vocab_size - 1, context_length=context_length, width=text_width,
                                    layers=text_layers, heads=text_heads, embed_dim=embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.register_buffer("merges", torch.full((vocab_size - SPECIAL_TOKENS, 2), -1, dtype=torch.long))
        self.caption_count = 0
        if captions is not None:
            self._learn_tokenizer(captions, tokenizer_captions, vocab_size)
        self.tokenizer = BPETokenizer.from_merges_tensor(self.merges)
        self.register_load_state_dict_post_hook(
            lambda module, _: setattr(module, "tokenizer", BPETokenizer.from_merges_tensor(module.merges)))

    def _learn_tokenizer(self, captions: Callable[[], Iterable[str]], limit: int, vocab_size: int) -> None:
        # Rank 0 reads the captions and learns the merges; every rank must tokenize identically.
        merges = None
        if dist.is_main():
            texts = list(islice(captions(), limit))
            merges = (BPETokenizer.train(texts, vocab_size).merges_tensor(), len(texts))
        merges_tensor, self.caption_count = dist.broadcast_object(merges)
        self.merges.copy_(merges_tensor)

    @torch.compiler.disable  # string processing on the host: a compiled step calls it as it is
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids ``[len(texts), context_length]``, on the model's device."""
        return self.tokenizer(texts, self.context_length).to(self.merges.device)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, C, H, W]`` -> L2-normalised embeddings ``[B, embed_dim]``."""
        return F.normalize(self.image_projection(self.backbone(images)).float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]`` -> L2-normalised embeddings ``[B, embed_dim]``."""
        return F.normalize(self.text(tokens).float(), dim=-1)

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        image = self.encode_image(views[0])
        text = self.encode_text(self.tokenize(batch["text"]))
        scale = self.logit_scale.exp()
        # Gathered with gradient: each rank's negatives are the whole global batch.
        image_all, text_all = dist.gather_with_grad(image), dist.gather_with_grad(text)
        if self.local_loss:
            loss = clip_loss(image, text, scale, image_keys=image_all, text_keys=text_all,
                             offset=dist.rank() * image.shape[0])
        else:
            loss = clip_loss(image_all, text_all, scale)
        return StepOutput(loss, logs={"logit_scale": scale.detach()}, embedding=image)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        # The paper clips the scale's parameter after each step so logits cannot exceed 100x the cosine.
        self.logit_scale.clamp_(0.0, math.log(self.max_logit_scale))

    def describe(self) -> dict[str, str]:
        learnt = int((self.merges[:, 0] >= 0).sum())
        origin = f" from {self.caption_count} training captions" if self.caption_count else ""
        return {"tokenizer": f"byte-level BPE, {learnt} merges{origin}",
                "loss": "local (n x N logits per rank)" if self.local_loss else "global (N x N logits)"}
