"""Run logging: a metrics JSONL file and a rich progress bar, both on rank 0 only."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sslcli import distributed as dist
from sslcli.losses.monitors import collapse_std, effective_rank

console = Console(stderr=True)


def info(message: str) -> None:
    if dist.is_main():
        console.print(message, highlight=False)


def warn(message: str) -> None:
    if dist.is_main():
        console.print(f"[bold yellow]warning:[/] {message}", highlight=False)


class MetricsLog:
    """Appends one JSON object per line to ``RUN/metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **record: Any) -> None:
        if dist.is_main():
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


class TrainProgress:
    """Progress bar with loss, lr, img/s and ETA; silent on ranks other than 0."""

    def __init__(self, total_steps: int, done_steps: int) -> None:
        self.enabled = dist.is_main()
        self.bar = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[ips]:.0f} img/s"
                       "{task.fields[health]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=not self.enabled,
        )
        self.task = self.bar.add_task("train", total=total_steps, completed=done_steps, epoch=0, loss=float("nan"),
                                      lr=0.0, ips=0.0, health="")

    def __enter__(self) -> TrainProgress:
        self.bar.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.bar.stop()

    def update(self, advance: int = 0, **fields: Any) -> None:
        if "embed_std" in fields:
            health = f"  std {fields.pop('embed_std'):.3f} rank {fields.pop('embed_rank'):.1f}"
            # DINO / SwAV: entropy of the teacher's (codes') and the student's distributions, log K = uniform.
            for key, short in (("teacher_entropy", "H_t"), ("student_entropy", "H_s")):
                if key in fields:
                    health += f" {short} {fields.pop(key):.2f}"
            fields["health"] = health
        self.bar.update(self.task, advance=advance, **fields)


class CollapseMonitor:
    """``embed_std`` and ``embed_rank`` of a step's output embeddings, with one warning the first
    time they look collapsed.

    Collapsed means either of: ``embed_std`` under a tenth of ``1 / sqrt(D)`` (the std of evenly
    spread unit vectors): every sample near one point; or an effective rank under ``RANK_FLOOR``
    (or 1% of the at most ``min(N - 1, D)`` directions a centred batch can use, when larger):
    every sample on a line or a plane, the form collapse takes behind a BN layer, which keeps each
    dimension's spread.  The rank is judged only with room for ``4 * RANK_FLOOR`` directions.
    Healthy runs sit far above both (docs/methods.md lists the values measured).
    """

    STD_FRACTION = 0.1
    RANK_FLOOR = 3.0
    RANK_FRACTION = 0.01

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, embedding: torch.Tensor | None, step: int) -> dict[str, float]:
        if embedding is None:
            return {}
        z = embedding.detach().flatten(1)
        n, d = z.shape
        room = min(n - 1, d)
        std, rank = float(collapse_std(z)), float(effective_rank(z))
        too_flat = std < self.STD_FRACTION / math.sqrt(d)
        too_thin = room >= 4 * self.RANK_FLOOR and rank < max(self.RANK_FLOOR, self.RANK_FRACTION * room)
        if (too_flat or too_thin) and not self.warned:
            self.warned = True
            warn(f"embeddings look collapsed at step {step}: embed_std {std:.4f} (evenly spread: "
                 f"{1 / math.sqrt(d):.4f}), embed_rank {rank:.2f} of at most {room}; the loss can fall while nothing "
                 "is learned: check the stop-gradient, the BN in the heads, the EMA momentum and the learning rate")
        return {"embed_std": round(std, 5), "embed_rank": round(rank, 3)}
