"""Which pairs of views a multi-view contrastive method compares (CMC, Tian et al., 2019, Sec. 3.2)."""

from __future__ import annotations

GRAPHS = ("full", "core")


def pairwise_edges(num_views: int, graph: str, core: int = 0) -> list[tuple[int, int]]:
    """The view pairs contrasted: all ``i < j`` (``full``) or ``(core, j)`` for every other ``j`` (``core``)."""
    if graph == "full":
        return [(i, j) for i in range(num_views) for j in range(i + 1, num_views)]
    if graph == "core":
        return [(core, j) for j in range(num_views) if j != core]
    raise ValueError(f"unknown graph {graph!r}; choose from {list(GRAPHS)}")


def directions(edges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Both directions ``(anchor view, memory view)`` of every edge."""
    return [d for i, j in edges for d in ((i, j), (j, i))]
