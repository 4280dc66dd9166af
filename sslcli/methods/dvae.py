"""dVAE: the discrete visual tokenizer of BEiT's stage 1 (Bao et al. 2022, Sec. 2.2; DALL-E's dVAE,
Ramesh et al. 2021, Sec. 2.1 and Appendix A), trained on the same unlabelled images.

    logits = enc(x);  z = gumbel_softmax(logits, tau)      # tau annealed 1 -> 1/16 (cosine)
    L = mse(dec(codebook(z)), x) + beta * KL(softmax(logits) || uniform)   # beta warmed up from 0

The run writes ``RUN/tokenizer.safetensors`` (no backbone: a tokenizer is not an encoder to
evaluate), which ``beit`` loads through ``method_args.tokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sslcli.augment import AugmentConfig
from sslcli.engine.schedule import schedule
from sslcli.losses import distribution_entropy, kl_to_uniform
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.dvae import DiscreteVAE, save_tokenizer

TOKENIZER_FILE = "tokenizer.safetensors"


@register_method("dvae")
class DVAE(Method):
    """Discrete VAE tokenizer (DALL-E / BEiT stage 1): Gumbel-softmax over a visual vocabulary, uniform prior."""

    has_backbone = False

    def __init__(self, encoder: None, augment: AugmentConfig, vocab: int = 8192, code_dim: int = 256,
                 widths: tuple[int, ...] = (64, 128, 256, 256), temperature: float = 1.0,
                 temperature_end: float = 1 / 16, kl_weight: float = 0.03, kl_warmup: float = 0.05) -> None:
        super().__init__(encoder)
        self.tokenizer = DiscreteVAE(vocab, code_dim, tuple(widths), channels=3)
        self.augment = augment
        self.track_progress(  # buffers: a compiled step reads them without recompiling as they change
            tau=lambda done: schedule(done, 1, start=temperature, end=temperature_end),
            beta=lambda done: schedule(done, 1, start=kl_weight, warmup=kl_warmup, kind="constant"))

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        images = views[0]
        tau, beta = self.tau, self.beta
        recon, logits = self.tokenizer(images, tau)
        mse = (recon.float() - images.float()).pow(2).mean()
        kl = kl_to_uniform(logits)
        # Codebook use: exp(entropy) of the batch's token histogram (K when every word is equally used).
        # index_add_ rather than bincount, whose output size depends on the data (a graph break when compiled)
        ids = logits.argmax(1).flatten()
        words = torch.zeros(self.tokenizer.vocab, device=ids.device).index_add_(0, ids, torch.ones_like(ids).float())
        codes = self.tokenizer.codebook(logits.softmax(1)).mean(dim=(2, 3))
        logs = {"recon_mse": mse.detach(), "kl": kl.detach(), "tau": tau.clone(),
                "perplexity": distribution_entropy(words[None] / words.sum(), probs=True).exp()}
        return StepOutput(mse + beta * kl, logs, embedding=codes)

    def after_step(self, progress: float) -> None:
        self.record_progress(progress)

    def export_backbone(self) -> None:
        return None

    def save_artifacts(self, out: Path) -> None:
        save_tokenizer(self.tokenizer, out / TOKENIZER_FILE,
                       {"image_size": str(self.augment.eval_size), "mean": json.dumps(list(self.augment.mean)),
                        "std": json.dumps(list(self.augment.std))})

    def describe(self) -> dict[str, str]:
        t = self.tokenizer
        return {"tokenizer": f"{t.vocab} words, a token per {t.stride}x{t.stride} px, widths {t.widths} "
                             "(the recipe's arch is not used)"}
