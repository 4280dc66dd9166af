"""SwAV (Caron et al., 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments").

Algorithm 1 of the paper, with multi-crop and the feature queue of the official code:

    C = normalize(C)                               # prototypes [K, D], unit rows, before every step
    z = normalize(g(f(x_v)))  for every crop v     # encoder once per resolution, projector on all crops
    scores_v = z_v C^T                             # [B, K]
    for each global crop s (no grad):
        q_s = sinkhorn([queue_s C^T; scores_s])[-B:]   # equipartitioned codes, eps 0.05, 3 iterations
    loss = mean_s mean_{t != s} -sum_k q_s log softmax(scores_t / tau)   # swapped prediction, tau 0.1
    the prototypes' gradient is cancelled during the first epoch

Sinkhorn equipartitions the global batch (sums all-reduced across ranks).  The queue (off by
default) holds the last ``queue_length`` embeddings of each global crop from all ranks, identical
on every rank; each rank feeds its ``1 / world`` share to Sinkhorn, so the global Sinkhorn sees
each queued embedding once.  It fills from ``queue_start_epoch`` and joins once full.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslcli import distributed as dist
from sslcli.augment import AugmentConfig
from sslcli.engine.feature_queue import FeatureQueue
from sslcli.engine.multicrop import forward_by_resolution
from sslcli.engine.sinkhorn import sinkhorn
from sslcli.errors import UserError
from sslcli.losses import distribution_entropy, swav_loss
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.heads import build_mlp, mlp_layers


@register_method("swav")
class SwAV(Method):
    """SwAV (Caron et al., 2020): multi-crop codes by Sinkhorn over learned prototypes, swapped prediction."""

    def __init__(self, encoder: Encoder, proj_hidden: int = 2048, proj_dim: int = 128, proj_layers: int = 2,
                 proj_norm: str | None = "bn", num_prototypes: int = 3000, temperature: float = 0.1,
                 epsilon: float = 0.05, sinkhorn_iterations: int = 3, freeze_prototypes_epochs: float = 1.0,
                 queue_length: int = 0, queue_start_epoch: float = 15.0, augment: AugmentConfig | None = None,
                 epochs: int | None = None) -> None:
        super().__init__(encoder)
        if augment is not None and augment.num_views < 2:
            raise UserError(f"swav needs at least 2 crops, the recipe makes {augment.num_views}; "
                            "raise --global-crops or add --local-crops")
        if epsilon <= 0 or sinkhorn_iterations < 1 or temperature <= 0:
            raise UserError("method_args.epsilon and temperature must be > 0 and sinkhorn_iterations >= 1")
        self.temperature, self.epsilon, self.iterations = temperature, epsilon, sinkhorn_iterations
        self.freeze_prototypes_epochs, self.queue_start_epoch = freeze_prototypes_epochs, queue_start_epoch
        self.epochs = epochs
        # Codes come from the global crops: the first view group (2 x 224 px in the paper).
        self.code_crops = augment.views[0].count if augment is not None else 2
        self.projector = build_mlp(encoder.dim, mlp_layers(proj_hidden, proj_dim, proj_layers, norm=proj_norm))
        self.prototypes = nn.Linear(proj_dim, num_prototypes, bias=False)
        self.queues = nn.ModuleList([FeatureQueue(queue_length, proj_dim) for _ in range(self.code_crops)]
                                    if queue_length > 0 else [])
        # Embeddings queued so far: the queue joins Sinkhorn once full.
        self.register_buffer("queued", torch.zeros((), dtype=torch.long))
        self.track_progress()
        self.register_load_state_dict_post_hook(lambda module, _: module.update_queue_flags())
        self.update_queue_flags()

    def epoch(self, progress: float) -> float:
        """The current (fractional) epoch; without the run's length every epoch setting counts as passed."""
        return progress * self.epochs if self.epochs is not None else math.inf

    def update_queue_flags(self) -> None:
        """The queue's state as host booleans, for ``forward`` to branch on. Each flips once a run (one
        recompile each when compiled); the device counter is read only while the queue fills."""
        self.queue_filling = bool(self.queues) and self.epoch(self.done) >= self.queue_start_epoch
        self.queue_full = self.queue_filling and int(self.queued) >= self.queues[0].size

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        with torch.no_grad():  # unit prototypes: the scores are cosines (official code, before each step)
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        features = forward_by_resolution(self.backbone, views)
        # One projector call over all crops, as in the official code: its BN normalises them together.
        z = F.normalize(self.projector(torch.cat(features)), dim=1)
        scores = self.prototypes(z).split([v.shape[0] for v in views])
        z = z.split([v.shape[0] for v in views])
        codes = self.codes(scores[: self.code_crops], z[: self.code_crops])
        loss = swav_loss(scores, codes, self.temperature)
        logs = {"teacher_entropy": distribution_entropy(torch.cat(codes), probs=True),
                "student_entropy": distribution_entropy(torch.cat(scores) / self.temperature)}
        return StepOutput(loss, logs, embedding=z[0])

    @torch.no_grad()
    def codes(self, scores: tuple[torch.Tensor, ...], z: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Sinkhorn codes ``[B, K]`` of each global crop, the queued embeddings' scores prepended when full."""
        batch = scores[0].shape[0]
        use_queue, fill_queue = self.queue_full, self.queue_filling
        codes = []
        for i, s in enumerate(scores):
            s = s.detach().float()
            if use_queue:
                share = self.queues[i].keys[dist.rank()::dist.world_size()]  # each queued row on one rank only
                s = torch.cat([(share @ self.prototypes.weight.T).float(), s])
            codes.append(sinkhorn(s, self.epsilon, self.iterations)[-batch:])
            if fill_queue:
                self.queues[i].enqueue(dist.gather_no_grad(z[i].float()))
        if fill_queue:
            self.queued += batch * dist.world_size()
        return codes

    def before_optimizer_step(self, progress: float) -> None:
        if self.epoch(progress) < self.freeze_prototypes_epochs:
            # None rather than zeros: the optimiser then skips them (no weight decay, no momentum).
            self.prototypes.weight.grad = None

    def after_step(self, progress: float) -> None:
        self.record_progress(progress)
        if not self.queue_full:
            self.update_queue_flags()

    def describe(self) -> dict[str, str]:
        queue = "off"
        if self.queues:
            queue = (f"{self.queues[0].size} embeddings per global crop from epoch {self.queue_start_epoch:g} "
                     f"({math.ceil(self.queues[0].size / dist.world_size())} in each rank's Sinkhorn)")
        return {"prototypes": f"{self.prototypes.out_features}, frozen for {self.freeze_prototypes_epochs:g} epochs",
                "codes": f"Sinkhorn over the first {self.code_crops} crops' scores, eps {self.epsilon:g}, "
                         f"{self.iterations} iterations", "queue": queue}
