"""InstDisc (Wu et al., 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination").

    f = normalize(g(h(x)))                      # one view; backbone + linear head to 128-d
    v = bank[i];  noise = bank[uniform(N, m)]   # positive: the image's own stored embedding
    Z = N * mean(exp(noise . f / t))            # first batch only (all-reduced), then fixed
    loss = NCE(f, v, noise, Z, t)               # -log h(v) - sum log(1 - h(noise)), h = P / (P + m / N)
    bank[i] <- normalize(m_b bank[i] + (1 - m_b) f)   for all_gather(i, f); m_b = 0.5 (proximal term)

Every image is its own class; the bank (``N x 128``, one row per training image) stands in for
the weights of an N-way classifier.  The paper uses m = 4096, t = 0.07, a linear head and draws
noise per sample; here one draw of m rows serves the whole batch (see ``sslcli.losses.nce``).
``mlp_hidden`` / ``head_norm`` build a deeper or normalised head (departures, for small data).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sslcli import distributed as dist
from sslcli.engine.memory_bank import MemoryBank
from sslcli.losses import collapse_std
from sslcli.losses.nce import estimate_partition, nce_loss
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.heads import build_mlp


@register_method("instdisc")
class InstDisc(Method):
    """InstDisc (Wu et al., CVPR 2018): one view, a memory bank with a row per image, NCE with 4096 noise rows."""

    def __init__(self, encoder: Encoder, num_samples: int, dim: int = 128, mlp_hidden: int = 0,
                 head_norm: str | None = None, num_noise: int = 4096, temperature: float = 0.07,
                 bank_momentum: float = 0.5) -> None:
        super().__init__(encoder)
        self.num_noise, self.temperature, self.bank_momentum = num_noise, temperature, bank_momentum
        hidden = [(mlp_hidden, head_norm, "relu")] if mlp_hidden else []
        self.head = build_mlp(encoder.dim, [*hidden, (dim, head_norm, None)])
        self.bank = MemoryBank(num_samples, dim)
        # Z in a buffer so that checkpoints (and resumed runs) keep the first batch's estimate.
        self.register_buffer("partition", torch.tensor(-1.0))
        self._partition_known = False  # saves a host sync per step once Z is set

    def _ensure_partition(self, f: torch.Tensor, noise: torch.Tensor) -> None:
        if self._partition_known:
            return
        if float(self.partition) <= 0:  # not estimated yet, nor loaded from a checkpoint
            z = estimate_partition(f, noise, self.temperature, self.bank.size)
            self.partition.copy_(dist.all_reduce_mean(z))  # one Z on every rank
        self._partition_known = True

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        f = F.normalize(self.head(self.backbone(views[0])).float(), dim=1)  # [B, dim]
        idx = batch["index"].to(f.device)
        noise = self.bank.rows(self.bank.sample(self.num_noise))  # [m, dim], shared by the batch
        positives = self.bank.rows(idx)  # [B, dim], read before this step's update
        self._ensure_partition(f, noise)
        loss = nce_loss(f, positives, noise, self.temperature, self.partition, self.bank.size)
        self.bank.update_(dist.gather_no_grad(idx), dist.gather_no_grad(f), self.bank_momentum)
        with torch.no_grad():
            logs = {"collapse_std": collapse_std(f), "pos_sim": (f * positives).sum(1).mean(),
                    "noise_sim": (f @ noise.T).mean(), "log_z": self.partition.log()}
        return StepOutput(loss, logs, embedding=f)

    def describe(self) -> dict[str, str]:
        return {"memory_bank": f"{self.bank.size} x {self.bank.dim}", "noise_samples": str(self.num_noise)}
