"""Heads are data: a list of layers, each ``(out_dim, norm, activation)``.

``build_mlp(2048, [(4096, "bn", "relu"), (256, None, None)])`` is BYOL's projector.  A linear
layer followed by a norm has no bias (the norm's shift replaces it), as in the papers' code.
Norms: ``"bn"``, ``"bn_noaffine"`` (MoCo v3's last projector BN), ``"ln"``, or ``None``.
Activations: ``"relu"``, ``"gelu"`` or ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

Layer = tuple[int, str | None, str | None]

_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "bn": nn.BatchNorm1d,
    "bn_noaffine": lambda d: nn.BatchNorm1d(d, affine=False),
    "ln": nn.LayerNorm,
}
_ACTS: dict[str, Callable[[], nn.Module]] = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


def build_mlp(in_dim: int, layers: Sequence[Layer]) -> nn.Sequential:
    """Builds ``Linear(-Norm)(-Act)`` blocks from a layer list (see module docstring)."""
    blocks: list[nn.Module] = []
    dim = in_dim
    for out, norm, act in layers:
        if norm is not None and norm not in _NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose from {sorted(_NORMS)}")
        if act is not None and act not in _ACTS:
            raise ValueError(f"unknown activation {act!r}; choose from {sorted(_ACTS)}")
        blocks.append(nn.Linear(dim, out, bias=norm is None))
        if norm is not None:
            blocks.append(_NORMS[norm](out))
        if act is not None:
            blocks.append(_ACTS[act]())
        dim = out
    return nn.Sequential(*blocks)


def mlp_layers(hidden: int, out: int, depth: int, norm: str | None = "bn", act: str = "relu",
               last_norm: str | None = None) -> list[Layer]:
    """The common ``depth``-layer layout: ``depth - 1`` hidden blocks then the output layer."""
    return [(hidden, norm, act)] * (depth - 1) + [(out, last_norm, None)]
