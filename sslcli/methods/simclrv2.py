"""SimCLR v2 (Chen et al., 2020, "Big Self-Supervised Models are Strong Semi-Supervised Learners").

    z = g(f(x))                                  # 3-layer projector: (Linear-BN-ReLU) x 2, Linear-BN
    k = normalize(g'(f'(x)))  no grad            # optional memory network: EMA of (f, g), m = 0.999
    loss = NT-Xent(z1, z2, t, negatives=memory)  # in-batch negatives, plus K buffered keys if memory
    enqueue(all_gather([k1, k2])); (f', g') <- m (f', g') + (1 - m) (f, g)

Pretraining is stage 1 of 3.  Stage 2 fine-tunes the backbone *and the projector's first layer*
on 1% or 10% of the labels (``sslcli finetune --keep-proj-layers 1``); stage 3 distils that
teacher into a student on the unlabelled images (``sslcli distill``).  See docs/methods/contrastive.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslcli import distributed as dist
from sslcli.engine.ema import ema_update_, make_target
from sslcli.engine.feature_queue import FeatureQueue
from sslcli.losses import collapse_std, nt_xent
from sslcli.methods.base import StepOutput, register_method
from sslcli.methods.simclr import SimCLR
from sslcli.models.encoders import Encoder


@register_method("simclrv2")
class SimCLRV2(SimCLR):
    """SimCLR v2 (Chen et al., NeurIPS 2020): a 3-layer projector, optional MoCo memory, then fine-tune and distil."""

    def __init__(self, encoder: Encoder, temperature: float = 0.1, proj_hidden: int | None = None,
                 proj_dim: int = 128, proj_layers: int = 3, proj_last_bn: bool = True, memory_size: int = 65536,
                 memory_momentum: float = 0.999) -> None:
        # The paper's hidden layers are as wide as the backbone's output (2048 for ResNet-50).
        super().__init__(encoder, temperature, proj_hidden or encoder.dim, proj_dim, proj_layers, proj_last_bn)
        self.memory_momentum = memory_momentum
        self.memory = FeatureQueue(memory_size, proj_dim) if memory_size else None
        # A frozen deep copy: in the state dict (checkpoints resume it), invisible to the optimiser.
        self.memory_net = make_target(nn.Sequential(encoder, self.projector)) if memory_size else None

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        x1, x2 = views[:2]
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        negatives = None if self.memory is None else self.memory.negatives()
        loss = nt_xent(z1, z2, self.temperature, keys1=dist.gather_with_grad(z1), keys2=dist.gather_with_grad(z2),
                       offset=dist.rank() * z1.shape[0], negatives=negatives)
        if self.memory is not None:
            with torch.no_grad():
                k1, k2 = F.normalize(self.memory_net(torch.cat([x1, x2])).float(), dim=1).chunk(2)
            # View by view, so the queue's order does not depend on how the batch is split across ranks.
            self.memory.enqueue(torch.cat([dist.gather_no_grad(k1), dist.gather_no_grad(k2)]))
        return StepOutput(loss, {"z_std": collapse_std(z1)}, embedding=z1)

    def after_step(self, progress: float) -> None:
        # The online pair as one module, so its parameter list lines up with the memory network's.
        if self.memory_net is not None:
            ema_update_(self.memory_net, nn.Sequential(self.backbone, self.projector), self.memory_momentum)
