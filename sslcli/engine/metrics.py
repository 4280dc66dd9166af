"""Run logging: a metrics JSONL file and a rich progress bar, both on rank 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sslcli import distributed as dist

console = Console(stderr=True)


def info(message: str) -> None:
    if dist.is_main():
        console.print(message, highlight=False)


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
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[ips]:.0f} img/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=not self.enabled,
        )
        self.task = self.bar.add_task("train", total=total_steps, completed=done_steps, epoch=0, loss=float("nan"),
                                      lr=0.0, ips=0.0)

    def __enter__(self) -> TrainProgress:
        self.bar.start()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.bar.stop()

    def update(self, advance: int = 0, **fields: Any) -> None:
        self.bar.update(self.task, advance=advance, **fields)
