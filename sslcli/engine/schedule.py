"""One schedule function for every scheduled quantity: lr, weight decay, EMA momentum, temperatures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

Kind = Literal["cosine", "linear", "constant", "step"]


def schedule(
    step: float,
    total: float,
    *,
    start: float,
    end: float | None = None,
    warmup: float = 0,
    warmup_from: float | None = None,
    kind: Kind = "cosine",
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
) -> float:
    """Value at ``step`` of a warm-up followed by a cosine, linear or constant phase.

    - ``0 <= step < warmup``: linear from ``warmup_from`` (default 0) to ``start``.
    - ``warmup <= step <= total``: ``cosine`` goes ``start -> end`` as
      ``end + (start - end) * (1 + cos(pi * t)) / 2`` with ``t`` the phase progress; ``linear``
      interpolates; ``constant`` stays at ``start``; ``step`` multiplies ``start`` by ``gamma``
      at each of the ``milestones`` passed (MoCo v1, InstDisc: x0.1 at epochs 120 and 160).
      Past ``total`` the final value holds.

    ``step``, ``total`` and ``warmup`` share one unit (steps or epochs).  Examples: the
    learning rate (``start=lr, end=0, warmup=10 epochs``), BYOL's EMA momentum
    (``start=0.996, end=1``), DINO's teacher temperature (``start=0.07, warmup_from=0.04,
    warmup=30 epochs, kind='constant'``).
    """
    end = start if end is None else end
    if step < warmup:
        origin = 0.0 if warmup_from is None else warmup_from
        return origin + (start - origin) * step / warmup
    if kind == "constant":
        return start
    if kind == "step":
        return start * gamma ** sum(step >= m for m in milestones)
    span = max(total - warmup, 1e-12)
    t = min(max((step - warmup) / span, 0.0), 1.0)
    if kind == "linear":
        return start + (end - start) * t
    if kind == "cosine":
        return end + (start - end) * (1 + math.cos(math.pi * t)) / 2
    raise ValueError(f"unknown schedule kind {kind!r}")
