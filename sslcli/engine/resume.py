"""What a training checkpoint holds and how a run resumes from one at the same sample.

A checkpoint carries the model (with the methods' buffers: queues, banks, EMA targets, the DINO
centre), the optimiser, the GradScaler, every rank's random generators, the loop position
(epoch and batches of it done, which is the data position) with the run's totals, and the config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sslcli import distributed as dist
from sslcli.atomic import atomic_path
from sslcli.engine import checkpoint, rng
from sslcli.errors import UserError


@dataclass
class LoopState:
    """Where the loop is: ``batch`` batches of ``epoch`` are trained on; totals cover the whole run."""

    epoch: int = 0
    batch: int = 0
    epoch_loss_sum: float = 0.0  # over the finite steps of this epoch, for the epoch-mean loss
    epoch_loss_steps: int = 0
    samples: int = 0  # all ranks
    bad_samples: int = 0
    bad_steps_in_row: int = 0

    def epoch_loss(self) -> float:
        return self.epoch_loss_sum / self.epoch_loss_steps if self.epoch_loss_steps else float("nan")


class RunCheckpoints:
    """Writes and restores a run's checkpoints in ``directory`` (rank 0 writes, every rank restores)."""

    def __init__(self, directory: Path, method: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, device: torch.device, *, keep: int, steps_per_epoch: int,
                 extra: dict[str, Any]) -> None:
        self.directory, self.method, self.optimizer, self.scaler, self.device = directory, method, optimizer, scaler, device
        self.keep, self.steps_per_epoch, self.extra = keep, steps_per_epoch, extra

    def save(self, loop: LoopState) -> Path:
        """A collective: every rank contributes its generator states.  ``loop.batch == steps_per_epoch``
        writes the epoch-end checkpoint (a candidate for the best), anything less a mid-epoch one."""
        rngs = rng.gather(rng.capture(), self.device)
        epoch_end = loop.batch >= self.steps_per_epoch
        path = checkpoint.checkpoint_path(self.directory, loop.epoch, None if epoch_end else loop.batch)
        if dist.is_main():
            state = {"model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict(), "epoch": loop.epoch, "rng": rngs,
                     "loop": dataclasses.asdict(loop), "steps_per_epoch": self.steps_per_epoch,
                     "world_size": dist.world_size(), **self.extra}
            checkpoint.save_and_prune(state, self.directory, loop.epoch, self.keep,
                                      batch=None if epoch_end else loop.batch,
                                      epoch_loss=loop.epoch_loss() if epoch_end else None)
        dist.barrier()
        return path

    def restore(self, path: Path, state: dict[str, Any], method_name: str, arch: str) -> LoopState:
        """Loads ``state`` (read from ``path``) into the run and returns where the loop continues."""
        checkpoint.check_compatible(state, path, method_name, arch, self.method.state_dict())
        saved = (state.get("steps_per_epoch", self.steps_per_epoch), state.get("world_size", dist.world_size()))
        loop = LoopState(**state["loop"]) if "loop" in state else LoopState(epoch=state["epoch"], batch=saved[0])
        epoch_end = loop.batch >= saved[0]
        if not epoch_end and saved != (self.steps_per_epoch, dist.world_size()):
            raise UserError(f"checkpoint '{path}' stops mid-epoch with {saved[0]} batches an epoch on {saved[1]} "
                            f"process(es); this run has {self.steps_per_epoch} on {dist.world_size()}: resume with the "
                            "same --batch-size, data and process count, or from an epoch-end checkpoint")
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        rng.restore(state["rng"][dist.rank() % len(state["rng"])])
        if epoch_end:  # an epoch-end checkpoint: the next epoch starts afresh
            loop = dataclasses.replace(loop, epoch=loop.epoch + 1, batch=0, epoch_loss_sum=0.0, epoch_loss_steps=0)
        return loop


def drop_metrics_after(path: Path, step: int) -> None:
    """Removes metrics records of steps after ``step``: a resumed run trains those steps again and logs them anew."""
    if not path.exists():
        return
    def before(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except ValueError:  # a line cut short when the process was killed
            return False

    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if before(line)]
    if len(kept) < len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(kept))
