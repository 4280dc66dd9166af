"""Image <-> text retrieval recall@k for CLIP-style embeddings whose captions repeat.

Synthetic captions repeat (several images can share one exact caption, and then one text
embedding), so the ground truth lives on unique caption strings.  With ``N`` images, ``U`` unique
captions, L2-normalised image embeddings ``x_i`` (``[N, D]``) and text embeddings ``t_u``
(``[U, D]``), ``s_iu = x_i . t_u`` and ``c(i)`` the unique caption of image ``i``:

    image->text R@k = mean_i [c(i) is among the k captions u with the largest s_iu]
    text->image R@k = mean_u [some image i with c(i) = u is among the k images with the largest s_iu]

text->image averages over the captions that have at least one image (extra captions in the
gallery are distractors for image->text only).

Ties are broken uniformly at random and the *expected* hit is reported, so a collapsed encoder
(all similarities equal) scores exactly chance instead of 1.0 (optimistic ties) or 0.0
(pessimistic ties).  With ``g`` candidates strictly more similar than the query's best ground
truth, ``n`` negatives tied with it and ``p`` tied positives, and ``j = k - g``:

    P(hit at k) = 1 - C(n, j) / C(n + p, j)    (0 when j <= 0)

For image->text ``p = 1`` and this is ``clamp(j / (n + 1), 0, 1)``.  A uniformly random ranking is
the all-tied case (``g = 0``), which gives the chance levels

    image->text chance at k = min(k, U) / U
    text->image chance at k = mean_u 1 - C(N - m_u, k) / C(N, k)    (m_u images have caption u)

Similarities are computed ``chunk_size`` images at a time in two passes (the first finds every
caption's best-matching image, the second counts the images above it), so the largest temporary
is ``chunk_size x U``, never ``N x U``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from sslcli.errors import UserError


def unique_texts(captions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct captions in first-seen order and a LongTensor ``[N]`` of each caption's index in them."""
    index: dict[str, int] = {}
    ids = [index.setdefault(caption, len(index)) for caption in captions]
    return list(index), torch.tensor(ids, dtype=torch.long)


def any_hit_probability(k: int, better: torch.Tensor, tied_negatives: torch.Tensor,
                        tied_positives: torch.Tensor) -> torch.Tensor:
    """``P(hit at k) = 1 - C(n, j) / C(n + p, j)``, ``j = k - g``, per query, float64 ``[Q]``.

    ``better`` (``g``), ``tied_negatives`` (``n``) and ``tied_positives`` (``p >= 1``) are ``[Q]``
    counts: the probability that at least one of ``p`` positives shuffled at random among ``n + p``
    tied candidates lands in the ``j`` slots left after the ``g`` strictly better candidates.
    """
    j = (k - better).double()
    n = tied_negatives.double()
    total = n + tied_positives.double()
    # Clamped so lgamma never sees a non-positive argument; the masked entries are replaced below.
    jj = torch.minimum(j.clamp(min=0), n)
    log_miss = torch.lgamma(n + 1) - torch.lgamma(n - jj + 1) - torch.lgamma(total + 1) + torch.lgamma(total - jj + 1)
    miss = torch.where(j <= n, log_miss.exp(), torch.zeros_like(j))
    return torch.where(j > 0, 1 - miss, torch.zeros_like(j))


def image_to_text_chance(k: int, num_unique: int) -> float:
    """``min(k, U) / U``: the image->text R@k of a uniformly random ranking of ``U`` captions."""
    return min(k, num_unique) / num_unique


def text_to_image_chance(k: int, counts: torch.Tensor, num_images: int) -> float:
    """``mean_u 1 - C(N - m_u, k) / C(N, k)`` over captions with ``m_u >= 1`` images (``counts [U]``)."""
    m = counts[counts > 0].double()
    return float(any_hit_probability(k, torch.zeros_like(m), num_images - m, m).mean())


def _check_inputs(image_emb: torch.Tensor, captions: Sequence[str], text_emb: torch.Tensor,
                  unique_captions: Sequence[str], ks: Sequence[int], chunk_size: int) -> tuple[list[int], torch.Tensor]:
    """The distinct ``ks`` and the caption index ``[N]``, after checking every shape and name."""
    ks = list(dict.fromkeys(ks))
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise UserError(f"recall ks must be positive integers, got {list(ks)}; pass e.g. 1,5,10")
    if chunk_size < 1:
        raise UserError(f"chunk size must be positive, got {chunk_size}; pass e.g. 4096")
    if image_emb.ndim != 2 or image_emb.shape[0] != len(captions) or image_emb.shape[0] == 0:
        raise UserError(f"image embeddings {tuple(image_emb.shape)} do not match {len(captions)} captions; "
                        "pass one [D] row per image, at least one image")
    if text_emb.ndim != 2 or text_emb.shape != (len(unique_captions), image_emb.shape[1]):
        raise UserError(f"text embeddings {tuple(text_emb.shape)} are not [{len(unique_captions)}, "
                        f"{image_emb.shape[1]}]; pass one row per unique caption, same width as the images")
    if not (torch.isfinite(image_emb).all() and torch.isfinite(text_emb).all()):
        # NaN compares false with everything, which would count as a perfect rank.
        raise UserError("embeddings contain NaN or inf; check the encoder checkpoint")
    index = {caption: u for u, caption in enumerate(unique_captions)}
    if len(index) != len(unique_captions):
        raise UserError("unique_captions has repeated strings; build it with unique_texts(captions)")
    missing = next((c for c in captions if c not in index), None)
    if missing is not None:
        raise UserError(f"caption {missing!r} is not in unique_captions; build it with unique_texts(captions)")
    return ks, torch.tensor([index[c] for c in captions], dtype=torch.long, device=image_emb.device)


def _similarity_chunks(image_emb: torch.Tensor, text_emb: torch.Tensor,
                       chunk_size: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, s [rows, U])`` for consecutive blocks of at most ``chunk_size`` images."""
    for start in range(0, image_emb.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        yield rows, image_emb[rows] @ text_emb.T


def retrieval_recall(image_emb: torch.Tensor, captions: Sequence[str], text_emb: torch.Tensor,
                     unique_captions: Sequence[str], ks: Sequence[int] = (1, 5, 10), *,
                     chunk_size: int = 4096) -> dict[str, float]:
    """Recall@k both ways plus the chance levels of a random ranking under the same duplicates.

    ``image_emb [N, D]`` and ``text_emb [U, D]`` are L2-normalised (ranking is by dot product);
    ``captions[i]`` is image ``i``'s caption and ``text_emb[u]`` embeds ``unique_captions[u]``
    (see :func:`unique_texts`).  Returns ``image_to_text_r{k}``, ``text_to_image_r{k}``,
    ``image_to_text_chance_r{k}`` and ``text_to_image_chance_r{k}`` for every ``k`` in ``ks``.
    """
    ks, ids = _check_inputs(image_emb, captions, text_emb, unique_captions, ks, chunk_size)
    text = text_emb.to(device=image_emb.device, dtype=image_emb.dtype)
    num_images, num_unique = len(captions), len(unique_captions)

    own = image_emb.new_empty(num_images)
    i2t_better = torch.empty(num_images, dtype=torch.long, device=image_emb.device)
    i2t_tied = torch.empty_like(i2t_better)
    for rows, sim in _similarity_chunks(image_emb, text, chunk_size):
        # The ground-truth similarity is read from the same matrix it is compared against, so a
        # row is never "better than itself" by a rounding difference between two products.
        gt = sim.gather(1, ids[rows, None])
        own[rows] = gt[:, 0]
        i2t_better[rows] = (sim > gt).sum(1)
        i2t_tied[rows] = (sim == gt).sum(1) - 1

    best = torch.full((num_unique,), float("-inf"), dtype=own.dtype, device=own.device)
    best = best.scatter_reduce(0, ids, own, reduce="amax")
    counts = torch.bincount(ids, minlength=num_unique)
    tied_pos = torch.bincount(ids[own == best[ids]], minlength=num_unique)
    t2i_better = torch.zeros_like(counts)
    t2i_tied = torch.zeros_like(counts)
    for _, sim in _similarity_chunks(image_emb, text, chunk_size):
        t2i_better += (sim > best).sum(0)
        t2i_tied += (sim == best).sum(0)

    has_image = counts > 0
    one = torch.ones_like(i2t_better)
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_to_text_r{k}"] = float(any_hit_probability(k, i2t_better, i2t_tied, one).mean())
    for k in ks:
        hit = any_hit_probability(k, t2i_better[has_image], (t2i_tied - tied_pos)[has_image], tied_pos[has_image])
        out[f"text_to_image_r{k}"] = float(hit.mean())
    for k in ks:
        out[f"image_to_text_chance_r{k}"] = image_to_text_chance(k, num_unique)
    for k in ks:
        out[f"text_to_image_chance_r{k}"] = text_to_image_chance(k, counts.cpu(), num_images)
    return out
