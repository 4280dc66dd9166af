"""Per-step safety checks: non-finite losses and gradients, and the share of bad samples in the data."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from sslcli import distributed as dist
from sslcli.engine.metrics import warn
from sslcli.errors import UserError

# The bad-sample share is judged only after this many samples (all ranks), so that a few broken
# images in the first batches of a healthy corpus do not stop the run.
MIN_SAMPLES_FOR_BAD_FRACTION = 256


class NonFiniteTraining(UserError):
    """Too many consecutive steps had a NaN/inf loss or gradient."""


class TooManyBadSamples(UserError):
    """The data is mostly broken."""


def grad_norm(params: Iterable[torch.nn.Parameter], clip: float | None) -> torch.Tensor:
    """The total gradient norm, after clipping to ``clip`` when given (one norm either way)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if clip:
        return torch.nn.utils.clip_grad_norm_(grads, clip)
    return torch.nn.utils.get_total_norm(grads)


class StepGuard:
    """Skips an optimiser step whose loss or gradient is not finite, and stops after ``max_bad_steps`` in a row.

    Deciding whether to step needs the verdict on the host before ``optimizer.step``: one read of a
    three-element tensor per step, which on a GPU waits for the backward pass to finish (on a CPU, where
    every op has finished when it returns, there is nothing to wait for; the GPU cost is not measured yet).  No cheaper
    exact check exists for every optimiser (LARS, SGD and AdamW alike): fp16's GradScaler reads its
    found-inf flag on the host in ``scaler.step`` just the same, and checking one step late would
    let the bad update through.  The same read carries the preemption flag, all-reduced so that
    every rank skips, or stops, at the same step.
    """

    def __init__(self, max_bad_steps: int, bad_steps_in_row: int = 0) -> None:
        self.max_bad_steps = max_bad_steps
        self.bad_steps_in_row = bad_steps_in_row

    def check(self, loss: torch.Tensor, norm: torch.Tensor, stop_requested: bool, step: int, *,
              overflow_expected: bool = False) -> tuple[bool, bool]:
        """``(step is finite, some rank asked to stop)``, the same on every rank.  ``overflow_expected``
        (fp16): a gradient overflow with a finite loss is the GradScaler probing its scale, not worth a warning."""
        flags = torch.stack([~torch.isfinite(loss.detach()), ~torch.isfinite(norm.to(loss.device)),
                             torch.tensor(stop_requested, device=loss.device)]).float()
        bad_loss, bad_grad, any_stop = (v > 0 for v in dist.all_reduce_sum_(flags).tolist())
        if not (bad_loss or bad_grad):
            self.bad_steps_in_row = 0
            return True, any_stop
        self.bad_steps_in_row += 1
        if self.bad_steps_in_row >= self.max_bad_steps:
            raise NonFiniteTraining(
                f"the loss or gradients were NaN/inf for {self.bad_steps_in_row} steps in a row (last at step {step}); "
                "lower the learning rate (--lr), train in --precision fp32 or bf16 instead of fp16, or set optim.clip_grad")
        if bad_loss or not overflow_expected:
            warn(f"non-finite {'loss' if bad_loss else 'gradient'} at step {step}: optimiser step skipped "
                 f"({self.bad_steps_in_row} in a row; the run stops at {self.max_bad_steps})")
        return False, any_stop


class BadSampleBudget:
    """Counts samples the loader skipped or replaced (``batch["bad_samples"]``) against ``max_fraction``
    of the samples trained on, over all ranks and the whole run (a resumed run carries its totals on)."""

    def __init__(self, max_fraction: float, device: torch.device, bad: int = 0, seen: int = 0) -> None:
        self.max_fraction, self.device = max_fraction, device
        self.bad, self.seen = bad, seen  # all ranks, as of the last sync
        self._pending = [0, 0]  # this rank's, since then

    def add(self, batch: dict[str, Any], batch_size: int) -> None:
        self._pending[0] += int(batch.get("bad_samples", 0))
        self._pending[1] += batch_size

    def sync(self) -> None:
        """Adds every rank's counts since the last sync to the totals and stops the run when too many are bad.
        A collective: every rank calls it at the same step (log steps and checkpoints)."""
        pending = dist.all_reduce_sum_(torch.tensor(self._pending, dtype=torch.int64, device=self.device))
        bad, seen = (int(v) for v in pending.tolist())
        self.bad, self.seen, self._pending = self.bad + bad, self.seen + seen, [0, 0]
        if self.seen >= MIN_SAMPLES_FOR_BAD_FRACTION and self.bad > self.max_fraction * self.seen:
            raise TooManyBadSamples(
                f"{self.bad} of {self.seen} samples were unreadable or undecodable, more than max_bad_fraction "
                f"{self.max_fraction:g}; check the data (regenerate the broken shards) or raise --max-bad-fraction")
