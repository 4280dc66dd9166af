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


def head_blocks(head: nn.Sequential) -> list[nn.Sequential]:
    """``head`` split into its ``Linear(-Norm)(-Act)`` blocks, the units of :func:`build_mlp`."""
    blocks: list[list[nn.Module]] = []
    for module in head:
        if isinstance(module, nn.Linear):
            blocks.append([])
        elif not blocks:
            raise ValueError(f"a head must start with a Linear layer, not {type(module).__name__}")
        blocks[-1].append(module)
    return [nn.Sequential(*block) for block in blocks]


def describe_layers(head: nn.Sequential) -> list[Layer]:
    """The layer list that :func:`build_mlp` turns back into ``head`` (same keys, same shapes)."""
    norm_names = {nn.BatchNorm1d: "bn", nn.LayerNorm: "ln"}
    act_names = {nn.ReLU: "relu", nn.GELU: "gelu"}
    layers: list[Layer] = []
    for block in head_blocks(head):
        linear, norm, act = block[0], None, None
        for module in list(block)[1:]:
            if type(module) in norm_names:
                affine = getattr(module, "affine", getattr(module, "elementwise_affine", True))
                norm = norm_names[type(module)] if affine else "bn_noaffine"
            elif type(module) in act_names:
                act = act_names[type(module)]
            else:
                raise ValueError(f"cannot describe a {type(module).__name__} in a head")
        layers.append((linear.out_features, norm, act))
    return layers
