"""Model FLOPs of one training step, and the device's measured dense matmul rate (the MFU denominator).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` while the method's own step runs
(``sslcli.engine.step.forward_backward``): every forward the method makes, the no-grad key / teacher
ones included, and the backward. FlopCounterMode counts matrix products, convolutions and attention
(2 FLOPs per multiply-add), not element-wise ops, norms or the optimiser: the usual convention for
model FLOPs utilisation.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of running ``step()`` once (it should run the forward and backward to be counted)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    per_timing = 10 if device.type == "cuda" else 3
    for _ in range(2):  # warm-up: kernel selection, oneDNN / cuBLAS workspaces
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_timing):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / per_timing)
    return 2 * n**3 / best


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> dict[str, object]:
    """The best rate of square matmuls in ``dtype`` on ``device`` over two sizes, in FLOP/s.

    Both sizes are large enough to fill the hardware and small enough to take seconds (on the reference
    CPU, n = 4096 in fp32 took 14 s for 4% more than 2048); which of the two is faster varied between runs."""
    sizes = (4096, 8192) if device.type == "cuda" else (1024, 2048)
    rates = {n: _rate(device, dtype, n, repeats) for n in sizes}
    n = max(rates, key=rates.__getitem__)
    return {"dtype": str(dtype).removeprefix("torch."), "n": n, "flop_per_s": rates[n]}
