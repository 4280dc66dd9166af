"""Run logging on rank 0: a metrics JSONL file (always), TensorBoard scalars (optional), log lines as text
or JSON, and rich progress bars for the long operations.

The CLI's global options (``sslcli --quiet --log-format json --tensorboard ...``) reach every command
through :func:`configure`.  Progress bars draw only on rank 0, on a terminal, and neither with ``--quiet``
nor with ``--log-format json`` (whose readers want one JSON object per line, not redrawn bars).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from sslcli import distributed as dist
from sslcli.errors import UserError
from sslcli.losses.monitors import collapse_std, effective_rank

console = Console(stderr=True)
LogFormat = Literal["text", "json"]
Item = TypeVar("Item")


@dataclass
class LogSettings:
    quiet: bool = False  # warnings and errors only
    log_format: LogFormat = "text"
    tensorboard: bool = False  # also write RUN/tensorboard/ event files where a metrics JSONL is written


settings = LogSettings()
_bar_active = False  # rich draws one live display at a time: an operation inside a training epoch gets none


def configure(*, quiet: bool = False, log_format: str = "text", tensorboard: bool = False) -> None:
    """Sets how this process logs (the CLI calls it once, from its global options)."""
    if log_format not in ("text", "json"):
        raise UserError(f"--log-format must be text or json, got {log_format!r}")
    if tensorboard:
        _summary_writer_class()  # fail now, not after the first epoch
    settings.quiet, settings.tensorboard = quiet, tensorboard
    settings.log_format = "json" if log_format == "json" else "text"


def _summary_writer_class() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package, which is not installed; "
                        "`pip install tensorboard`, or drop --tensorboard (RUN/metrics.jsonl has the same numbers)") \
            from None
    return SummaryWriter


def _emit(level: str, message: str, style: str = "") -> None:
    """One log line on stderr: rich text, or ``{"time", "level", "message"}`` as JSON."""
    if not dist.is_main():
        return
    if settings.log_format == "json":
        record = {"time": round(time.time(), 3), "level": level, "message": Text.from_markup(message).plain}
        sys.stderr.write(json.dumps(record) + "\n")
        sys.stderr.flush()
    else:
        console.print(f"{style}{message}", highlight=False, soft_wrap=True)


def info(message: str) -> None:
    if not settings.quiet:
        _emit("info", message)


def warn(message: str) -> None:
    _emit("warning", message, "[bold yellow]warning:[/] ")


def error(message: str) -> None:
    """``message`` is plain text (not rich markup): it often quotes a user's path."""
    _emit("error", Text(message).markup, "[bold red]error:[/] ")


class _ToLog(logging.Handler):
    """Sends the records of the ``sslcli.*`` Python loggers (the data loader's warnings) through
    :func:`warn` / :func:`error` / :func:`info`, so they follow --quiet and --log-format like every line."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            error(message)
        else:
            (warn if record.levelno >= logging.WARNING else info)(Text(message).markup)


# Records still propagate: a caller's own handlers (pytest's caplog) see them as well.
logging.getLogger("sslcli").addHandler(_ToLog())


def progress_enabled() -> bool:
    """Whether a progress bar may draw now: rank 0, a terminal, text logs, not quiet, no other bar."""
    return (dist.is_main() and not settings.quiet and settings.log_format == "text" and console.is_terminal
            and not _bar_active)


def _bar(*columns: Any, enabled: bool, transient: bool = False) -> Progress:
    return Progress(*columns, console=console, disable=not enabled, transient=transient)


def track(items: Iterable[Item], total: int | None, description: str) -> Iterator[Item]:
    """``items`` unchanged, with a transient progress bar of ``total`` steps while they are consumed."""
    global _bar_active
    if not progress_enabled():
        yield from items
        return
    _bar_active = True
    try:
        with _bar(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), enabled=True, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
    finally:
        _bar_active = False


class MetricsLog:
    """Appends one JSON object per line to ``RUN/metrics.jsonl``; with TensorBoard on, also writes each
    number as a scalar (tag = key, step = ``step``) under ``RUN/tensorboard/``.  With JSON logs each record
    also goes to the log stream, so a cluster log shows progress without a bar."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: Any = None
        if settings.tensorboard and dist.is_main():
            self._writer = _summary_writer_class()(log_dir=str(path.parent / "tensorboard"))

    def write(self, **record: Any) -> None:
        if not dist.is_main():
            return
        line = json.dumps({"time": round(time.time(), 3), **record})
        with open(self.path, "a") as fh:
            fh.write(line + "\n")
        if settings.log_format == "json" and not settings.quiet:
            sys.stderr.write(json.dumps({"level": "info", "event": "metrics", **json.loads(line)}) + "\n")
            sys.stderr.flush()
        if self._writer is not None and "step" in record:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, record["step"])
            self._writer.flush()


class TrainProgress:
    """Progress bar with loss, lr, img/s and ETA; silent on ranks other than 0."""

    def __init__(self, total_steps: int, done_steps: int) -> None:
        self.enabled = progress_enabled()
        self.bar = _bar(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[ips]:.0f} img/s"
                       "{task.fields[health]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), enabled=self.enabled,
        )
        self.task = self.bar.add_task("train", total=total_steps, completed=done_steps, epoch=0, loss=float("nan"),
                                      lr=0.0, ips=0.0, health="")

    def __enter__(self) -> TrainProgress:
        global _bar_active
        if self.enabled:
            self.bar.start()
            _bar_active = True
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        global _bar_active
        if self.enabled:
            self.bar.stop()
            _bar_active = False

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
    Healthy runs sit far above both (docs/methods/monitors.md lists the values measured).
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
