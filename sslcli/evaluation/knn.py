"""Weighted k-nearest-neighbour classification of frozen features (InstDisc, DINO).

The train split's features are the memory, the test split's the queries.  With
``z~ = z / ||z||``, a query ``q`` and memory items ``i``:

    s_qi      = z~_q . z~_i                                 (cosine similarity)
    N_k(q)    = the k memory items with the largest s_qi
    score_qc  = sum_{i in N_k(q)} exp((s_qi - s_q1) / T) * [y_i = c]
    pred_q    = argmax_c score_qc

where ``s_q1`` is the query's largest similarity.  This is the vote ``exp(s_qi / T)`` of Wu et
al. (2018) and DINO multiplied by the per-query constant ``exp(-s_q1 / T)``: every class
ranking, hence every accuracy, is unchanged, but weights stay in ``(0, 1]`` so a small ``T``
cannot overflow float32 (``exp(1 / 0.01)`` does) and the nearest neighbour always votes 1.

Queries are processed ``chunk_size`` at a time and, optionally, the memory
``memory_chunk_size`` items at a time with a running top-k merge, so the largest temporary
is ``chunk_size x min(N, memory_chunk_size)`` similarities, never ``Q x N``.  The memory is
not copied to normalise it: each chunk's dot products are scaled by the items' inverse norms
``1 / ||z_i||`` (an ``[N]`` vector), so beyond the features themselves the peak memory is set
by the chunk sizes, not by ``N`` (``benchmarks/knn_memory.py`` measures it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from sslcli import distributed as dist
from sslcli.data.reader import DataSource
from sslcli.engine.metrics import track
from sslcli.errors import UserError
from sslcli.evaluation.features import extract_labelled
from sslcli.evaluation.results import topk_accuracy

if TYPE_CHECKING:
    from sslcli.evaluation.feature_cache import FeatureCache


def _check_params(k: int | Sequence[int], temperature: float, memory_size: int) -> list[int]:
    """The distinct ``k`` in the given order, after checking them and the temperature."""
    if temperature <= 0:
        raise UserError(f"--temperature must be positive, got {temperature}")
    ks = [k] if isinstance(k, int) else list(dict.fromkeys(k))
    if not ks:
        raise UserError("no k given; pass at least one --k")
    for value in ks:
        if not 1 <= value <= memory_size:
            raise UserError(f"k={value} is not between 1 and the memory size {memory_size}; pass a smaller --k")
    return ks


def _top_neighbours(queries: torch.Tensor, memory: torch.Tensor, inv_norm: torch.Tensor, k: int,
                    memory_chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and memory indices of each (unit) query's ``k`` nearest items, most similar
    first; ``inv_norm [N]`` holds the memory items' ``1 / ||z_i||``."""
    step = memory.shape[0] if memory_chunk_size is None else memory_chunk_size
    best_sim = queries.new_empty((queries.shape[0], 0))
    best_idx = torch.empty((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, memory.shape[0], step):
        sim = (queries @ memory[start : start + step].T).mul_(inv_norm[start : start + step])
        sim, idx = sim.topk(min(k, sim.shape[1]), dim=1)
        # The k best of (best so far + this chunk's k best) are the k best of everything seen.
        best_sim = torch.cat([best_sim, sim], dim=1)
        best_idx = torch.cat([best_idx, idx + start], dim=1)
        best_sim, order = best_sim.topk(min(k, best_sim.shape[1]), dim=1)
        best_idx = best_idx.gather(1, order)
    return best_sim, best_idx


def _vote(sim: torch.Tensor, labels: torch.Tensor, temperature: float, num_classes: int) -> torch.Tensor:
    """``score_qc = sum_i exp((s_qi - s_q1) / T) [y_i = c]`` over the given (sorted) neighbours."""
    weights = torch.exp((sim - sim[:, :1]) / temperature)
    scores = torch.zeros((sim.shape[0], num_classes), dtype=weights.dtype, device=sim.device)
    return scores.scatter_add_(1, labels, weights)


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    *,
    k: int | Sequence[int] = 20,
    temperature: float = 0.07,
    num_classes: int,
    chunk_size: int = 1024,
    memory_chunk_size: int | None = None,
) -> dict[int, torch.Tensor]:
    """Class scores ``[Q, num_classes]`` for each ``k`` (see the module docstring).

    All ``k`` share one neighbour search with the largest ``k``.  ``memory_chunk_size=None``
    compares each query chunk with the whole memory at once.  Tensors may live on any
    device; the scores are float32 on that device.
    """
    if chunk_size < 1 or (memory_chunk_size is not None and memory_chunk_size < 1):
        raise ValueError("chunk sizes must be positive")
    if train_labels.numel() and not (0 <= int(train_labels.min()) and int(train_labels.max()) < num_classes):
        raise ValueError(f"train labels must lie in [0, {num_classes})")
    ks = _check_params(k, temperature, train_feats.shape[0])
    memory = train_feats.float()  # no copy for float32 features
    # F.normalize's x / max(||x||, eps), applied to the similarities instead of to a copy of the memory.
    inv_norm = torch.linalg.vector_norm(memory, dim=1).clamp_min_(1e-12).reciprocal_()
    labels = train_labels.to(memory.device).long()
    chunks: dict[int, list[torch.Tensor]] = {kk: [] for kk in ks}
    starts = range(0, test_feats.shape[0], chunk_size)
    for start in track(starts, len(starts), "kNN"):
        queries = F.normalize(test_feats[start : start + chunk_size].float().to(memory.device), dim=1)
        sim, idx = _top_neighbours(queries, memory, inv_norm, max(ks), memory_chunk_size)
        neighbour_labels = labels[idx]
        for kk in ks:
            chunks[kk].append(_vote(sim[:, :kk], neighbour_labels[:, :kk], temperature, num_classes))
    empty = memory.new_zeros((0, num_classes))
    return {kk: torch.cat(parts) if parts else empty for kk, parts in chunks.items()}


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int | Sequence[int] = 20,
    temperature: float = 0.07,
    num_classes: int,
    chunk_size: int = 1024,
    memory_chunk_size: int | None = None,
) -> dict[int, dict[str, float]]:
    """``{k: {"top1": ..., "top5": ...}}`` of :func:`knn_classify` against ``test_labels``."""
    scores = knn_classify(train_feats, train_labels, test_feats, k=k, temperature=temperature,
                          num_classes=num_classes, chunk_size=chunk_size, memory_chunk_size=memory_chunk_size)
    return {kk: topk_accuracy(s, test_labels) for kk, s in scores.items()}


def knn_evaluate(
    encoder: nn.Module,
    train_source: DataSource,
    test_source: DataSource,
    transform: Callable[[Any], torch.Tensor],
    *,
    k: int | Sequence[int] = 20,
    temperature: float = 0.07,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    chunk_size: int = 1024,
    memory_chunk_size: int | None = 65536,
    log: Callable[[str], None] | None = None,
    cache: FeatureCache | None = None,
) -> dict[str, Any]:
    """Extracts features of both splits and classifies the test split by kNN on the train split.

    Returns ``{"top1", "top5"}`` for the first ``k`` given plus ``"per_k": {"<k>": {...}}``
    for all of them.  The neighbour search runs on ``device``; the default chunks bound its
    largest temporary to 1024 x 65536 similarities (256 MiB) whatever the memory size.  ``log``
    gets progress lines; ``cache`` (a :class:`FeatureCache`) reuses features stored earlier.  Under
    torchrun the ranks share the extraction and rank 0 alone runs the search; every rank returns its result.
    """
    # Checked before extraction, which may take long, so a bad --k fails at once.
    ks = _check_params(k, temperature, train_source.num_samples)
    feats = extract_labelled(encoder, train_source, test_source, transform, batch_size=batch_size,
                             device=device, num_workers=num_workers, log=log, cache=cache)
    # Every rank holds all features after extraction; the search runs once and its result reaches all.
    per_k = dist.on_main(lambda: knn_accuracy(
        feats.train_x.to(device), feats.train_y, feats.test_x, feats.test_y, k=ks, temperature=temperature,
        num_classes=feats.num_classes, chunk_size=chunk_size, memory_chunk_size=memory_chunk_size))
    primary = per_k[ks[0]]
    return {**primary, "per_k": {str(kk): acc for kk, acc in per_k.items()}}
