"""Every loss runs in float32 under bf16 / fp16 autocast (issue 8: fp16 contrastive logits and DINO's
softmax are a known source of NaNs), and equals the float32 computation on the same inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sslcli.losses import (
    barlow_twins_loss,
    byol_loss,
    dino_loss,
    distillation_loss,
    in_batch_contrastive,
    info_nce,
    masked_token_loss,
    negative_cosine,
    nt_xent,
    swav_loss,
)
from sslcli.losses.clip import clip_loss
from sslcli.losses.colorization import colorization_loss
from sslcli.losses.cpc import cpc_info_nce
from sslcli.losses.dense import dense_info_nce
from sslcli.losses.invaspread import invaspread_loss
from sslcli.losses.nce import nce_loss

B, D, K = 8, 16, 32


def _inputs() -> dict[str, Callable[[], tuple[Callable[..., torch.Tensor], list[Any], dict[str, Any]]]]:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    codes = F.softmax(r(B, K), dim=1)
    return {
        "info_nce": lambda: (info_nce, [r(B, D), r(B, D), r(K, D)], {"temperature": 0.07}),
        "in_batch_contrastive": lambda: (in_batch_contrastive, [r(B, D), r(B, D)], {"temperature": 0.1}),
        "nt_xent": lambda: (nt_xent, [r(B, D), r(B, D)], {"temperature": 0.1}),
        "clip_loss": lambda: (clip_loss, [r(B, D), r(B, D), 14.3], {}),
        "cpc_info_nce": lambda: (cpc_info_nce, [r(2, 4, 4, D), r(2, 4, 4, D), 2], {}),
        "dense_info_nce": lambda: (dense_info_nce, [r(2, 4, D), r(2, 4, D), torch.randint(0, 4, (2, 4), generator=g),
                                                    r(K, D)], {"temperature": 0.2}),
        "invaspread_loss": lambda: (invaspread_loss, [r(B, D), r(B, D)], {}),
        "nce_loss": lambda: (nce_loss, [r(B, D), r(B, D), r(K, D), 0.07, 5.0, 100], {}),
        "negative_cosine": lambda: (negative_cosine, [r(B, D), r(B, D)], {}),
        "byol_loss": lambda: (byol_loss, [r(B, D), r(B, D)], {}),
        "barlow_twins_loss": lambda: (barlow_twins_loss, [r(B, D), r(B, D)], {}),
        "swav_loss": lambda: (swav_loss, [[r(B, K), r(B, K)], [codes, codes.flip(0)]], {}),
        "dino_loss": lambda: (dino_loss, [[r(B, K), r(B, K)], [r(B, K), r(B, K)], r(1, K)], {}),
        "distillation_loss": lambda: (distillation_loss, [r(B, K), r(B, K)], {"temperature": 2.0}),
        "masked_token_loss": lambda: (masked_token_loss, [r(6, K), torch.randint(0, K, (2, 5), generator=g),
                                                          torch.tensor([[1, 0, 1, 0, 1], [0, 1, 0, 1, 1]]).bool()], {}),
        "colorization_loss": lambda: (colorization_loss, [r(2, K, 4, 4), F.softmax(r(2, K, 4, 4), dim=1), r(K).abs()],
                                      {}),
    }


CASES = _inputs()


def _low(value: Any, dtype: torch.dtype) -> Any:
    """What a layer under autocast hands the loss: its floating outputs in the autocast dtype."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype).requires_grad_()
    if isinstance(value, list):
        return [_low(v, dtype) for v in value]
    return value


def _as_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().float()
    if isinstance(value, list):
        return [_as_float32(v) for v in value]
    return value


def _tensors(values: list[Any]) -> list[torch.Tensor]:
    flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
    return [v for v in flat if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_each_loss_is_float32_under_autocast_and_equals_the_float32_loss(name: str, dtype: torch.dtype) -> None:
    loss_fn, args, kwargs = CASES[name]()
    low = [_low(a, dtype) for a in args]
    with torch.autocast("cpu", dtype=dtype):
        mixed = loss_fn(*low, **kwargs)
    reference = loss_fn(*[_as_float32(a) for a in low], **kwargs)  # the same values, no autocast
    assert mixed.dtype == torch.float32
    assert torch.isfinite(mixed)
    assert torch.equal(mixed, reference), (mixed.item(), reference.item())
    mixed.backward()  # the gradient reaches the low-precision activations through the casts (targets are detached)
    grads = [t.grad for t in _tensors(low) if t.grad is not None]
    assert grads and all(g.dtype == dtype for g in grads)


def test_without_the_float32_guard_autocast_lowers_the_logits() -> None:
    """The guard is what makes the test above pass: autocast casts a matmul of float32 inputs to bf16."""
    loss_fn, args, kwargs = CASES["info_nce"]()
    low = [_low(a, torch.bfloat16) for a in args]
    reference = info_nce(*[_as_float32(a) for a in low], **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unguarded = info_nce.__wrapped__(*low, **kwargs)
    assert not torch.equal(unguarded, reference)
