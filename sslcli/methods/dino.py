"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Algorithm 1 of the paper, with multi-crop and the official code's schedules:

    gs, gt = student, teacher = backbone + DINO head      # teacher: EMA of the student, same init
    for x in loader:
        x1, x2, locals = augment(x)                       # 2 global crops + N local crops
        t = gt(x1), gt(x2)                                # teacher: global crops only, no grad
        s = gs(x1), gs(x2), gs(locals)...                 # student: every crop
        loss = mean over pairs (t_i, s_j), j != i of H(t_i, s_j)
        H(t, s) = -softmax((t - C) / tpt) . log_softmax(s / tps)
        C = m C + (1 - m) mean(t)                         # centre, all-reduced over ranks
        gt.params = l gt.params + (1 - l) gs.params       # l: 0.996 -> 1 (cosine)

tps 0.1; tpt warms up linearly 0.04 -> 0.07 over 30 epochs, then stays; the head's last layer
gets no update during the first epoch (``freeze_last_layer``), as in the official code.
The exported backbone is the student's by default; ``export: teacher`` exports the teacher's,
the network the paper evaluates (it is the better one through most of training).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from sslcli.engine.ema import ema_update_, make_target
from sslcli.engine.multicrop import forward_by_resolution
from sslcli.engine.schedule import schedule
from sslcli.errors import UserError
from sslcli.losses import dino_loss, distribution_entropy, update_center
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.dino_head import DINOHead
from sslcli.models.encoders import Encoder


@register_method("dino")
class DINO(Method):
    """DINO (Caron et al., 2021): self-distillation to an EMA teacher with centring and sharpening, multi-crop."""

    def __init__(self, encoder: Encoder, epochs: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, head_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True,
                 global_crops: int = 2, student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: float = 30,
                 center_momentum: float = 0.9, momentum: float = 0.996, momentum_end: float = 1.0,
                 freeze_last_layer: float = 1, export: Literal["student", "teacher"] = "student") -> None:
        super().__init__(encoder)
        if export not in ("student", "teacher"):
            raise UserError(f"method_args.export must be 'student' or 'teacher', got {export!r}")
        self.epochs, self.global_crops, self.export = epochs, global_crops, export
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.warmup_teacher_temp, self.warmup_teacher_temp_epochs = warmup_teacher_temp, warmup_teacher_temp_epochs
        self.center_momentum, self.momentum, self.momentum_end = center_momentum, momentum, momentum_end
        self.freeze_last_layer = freeze_last_layer
        self.head = DINOHead(encoder.dim, out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                             layers=head_layers, use_bn=use_bn, norm_last_layer=norm_last_layer)
        self.student = torch.nn.Sequential(encoder, self.head)
        self.teacher = make_target(self.student)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.track_progress(current_teacher_temp=self.teacher_temp_at)  # right after --resume too

    def teacher_temp_at(self, progress: float) -> float:
        return schedule(progress * self.epochs, self.epochs, start=self.teacher_temp,
                        warmup=self.warmup_teacher_temp_epochs, warmup_from=self.warmup_teacher_temp, kind="constant")

    def _student_bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.bottleneck(self.backbone(x))

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        if len(views) < self.global_crops:
            raise UserError(f"DINO's teacher needs {self.global_crops} global crops but the recipe gives "
                            f"{len(views)} view(s); add views to augment.views or lower method_args.global_crops")
        with torch.no_grad():
            teacher_out = forward_by_resolution(self.teacher, views[: self.global_crops])
        bottlenecks = forward_by_resolution(self._student_bottleneck, views)
        # One pass through the last layer for every crop: its weight is normalised once per step.
        student_out = list(self.head.last_layer(torch.cat(bottlenecks)).split([v.shape[0] for v in views]))
        temp = self.current_teacher_temp  # a buffer, so a compiled step does not recompile as it changes
        loss = dino_loss(student_out, teacher_out, self.center, student_temp=self.student_temp, teacher_temp=temp)
        teacher_all = torch.cat(teacher_out)
        logs = {"teacher_entropy": distribution_entropy((teacher_all.float() - self.center) / temp),
                "student_entropy": distribution_entropy(torch.cat(student_out).float() / self.student_temp),
                "teacher_temp": temp.clone()}  # a copy: the buffer moves on before the log is read
        self.center.copy_(update_center(self.center, teacher_all, self.center_momentum))
        return StepOutput(loss, logs, embedding=bottlenecks[0])

    def before_optimizer_step(self, progress: float) -> None:
        if progress * self.epochs < self.freeze_last_layer:
            # No gradient at all (not a zero one): the optimiser skips the layer, weight decay included.
            for p in self.head.last_layer.parameters():
                p.grad = None

    def after_step(self, progress: float) -> None:
        self.record_progress(progress)
        ema_update_(self.teacher, self.student, schedule(progress, 1.0, start=self.momentum, end=self.momentum_end))

    def export_backbone(self) -> Encoder:
        return self.teacher[0] if self.export == "teacher" else self.backbone

    def describe(self) -> dict[str, str]:
        return {"exported backbone": self.export}
