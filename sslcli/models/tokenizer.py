"""Byte-level BPE tokenizer for the CLIP text tower, trained from the dataset's own captions.

The scheme is GPT-2's byte-level BPE (Radford et al. 2019), as reused by CLIP (Radford et al. 2021):

* ids ``0..255`` are the raw UTF-8 bytes, so every string is encodable and nothing is ever
  out of vocabulary: a character never seen in training (emoji, accents, CJK) simply stays as its
  UTF-8 byte tokens -- that *is* the unknown-character handling, there is no ``<unk>`` id;
* id ``256 + i`` is the i-th learnt merge of two existing ids, in the order learnt;
* the last two ids are ``sot`` (``vocab_size - 2``) and ``eot`` (``vocab_size - 1``).

Text is normalised first (:func:`normalize`: lower-case, whitespace collapsed, as CLIP's cleaning),
then pre-tokenised into chunks (letters / digits / punctuation, each with an optional leading
space, like GPT-2's regex); merges never cross a chunk boundary, so a word's tokens do not depend
on its neighbours and chunks can be counted once and cached. ``decode(encode(t)) == normalize(t)``
holds for every string.

Training is the textbook algorithm (Sennrich et al. 2016): repeatedly merge the most frequent
adjacent pair, ties broken by the smallest ``(left, right)`` pair so that every distributed rank
learns identical merges from identical captions, stopping at capacity or when no pair occurs twice.
It is made fast by counting distinct chunks once and updating pair counts incrementally.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import torch

_CHUNK = re.compile(r" ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+")  # '_' is \w but no letter: give it a home
_SPECIALS = 2
_CACHE_LIMIT = 100_000  # chunk strings kept per tokenizer; bounded because free text is unbounded


def normalize(text: str) -> str:
    """Lower-case, strip, collapse whitespace runs to one space, drop NUL.

    NUL is dropped so that byte id 0 never comes out of :meth:`BPETokenizer.encode`, which leaves
    0 free to mean padding (as in open_clip) without making decoding ambiguous.
    """
    return " ".join(text.replace("\x00", "").lower().split())


def _chunks(text: str) -> list[str]:
    return _CHUNK.findall(normalize(text))


def _merge(word: Sequence[int], a: int, b: int, new: int) -> list[int]:
    """Replace every ``(a, b)`` in ``word`` by ``new``, left to right (so ``aaa`` -> ``Xa``)."""
    out: list[int] = []
    i, n = 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


class BPETokenizer:
    """Byte-level BPE: bytes ``0..255``, merges ``256..vocab_size-3``, then ``sot``, ``eot``."""

    def __init__(self, merges: Sequence[tuple[int, int]], vocab_size: int) -> None:
        if vocab_size < 256 + _SPECIALS:
            raise ValueError(f"vocab_size must be >= 258 (256 bytes + sot + eot), got {vocab_size}")
        if len(merges) > vocab_size - 256 - _SPECIALS:
            raise ValueError(f"{len(merges)} merges do not fit in vocab_size {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.sot = self.vocab_size - 2
        self.eot = self.vocab_size - 1
        self.merges: list[tuple[int, int]] = []
        self._ranks: dict[tuple[int, int], int] = {}
        self._bytes: list[bytes] = [bytes([i]) for i in range(256)]
        for i, (a, b) in enumerate(merges):
            a, b = int(a), int(b)
            if not (0 <= a < 256 + i and 0 <= b < 256 + i):  # a merge may only use ids that exist already
                raise ValueError(f"merge {i} = ({a}, {b}) refers to an id not yet defined")
            self.merges.append((a, b))
            self._ranks.setdefault((a, b), i)
            self._bytes.append(self._bytes[a] + self._bytes[b])
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn up to ``vocab_size - 258`` merges from ``texts`` (deterministic)."""
        capacity = vocab_size - 256 - _SPECIALS
        if capacity < 0:
            raise ValueError(f"vocab_size must be >= 258 (256 bytes + sot + eot), got {vocab_size}")
        freq: Counter[str] = Counter()
        for text in texts:  # captions repeat a lot: count each distinct chunk once
            freq.update(_chunks(text))
        # Sorted so that word indices, hence everything downstream, do not depend on input order.
        words = [list(chunk.encode("utf-8")) for chunk in sorted(freq)]
        counts_of = [freq[chunk] for chunk in sorted(freq)]
        pairs: defaultdict[tuple[int, int], int] = defaultdict(int)
        where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
        for idx, (word, n) in enumerate(zip(words, counts_of)):
            for pair in zip(word, word[1:]):
                pairs[pair] += n
                where[pair].add(idx)
        # Max-heap on (count, smallest pair) with lazy deletion: stale entries are skipped on pop,
        # which avoids a full scan of the pair table per merge.
        heap = [(-n, pair) for pair, n in pairs.items()]
        heapq.heapify(heap)
        merges: list[tuple[int, int]] = []
        while len(merges) < capacity and heap:
            neg, best = heap[0]
            if pairs.get(best, 0) != -neg:
                heapq.heappop(heap)
                continue
            if -neg < 2:  # a pair seen once would only memorise one chunk
                break
            a, b = best
            new = 256 + len(merges)
            merges.append(best)
            changed: set[tuple[int, int]] = set()
            for idx in where.pop(best):
                old = words[idx]
                merged = _merge(old, a, b, new)
                if len(merged) == len(old):  # stale index: this word lost the pair earlier
                    continue
                n = counts_of[idx]
                for pair in zip(old, old[1:]):
                    pairs[pair] -= n
                    changed.add(pair)
                for pair in zip(merged, merged[1:]):
                    pairs[pair] += n
                    where[pair].add(idx)
                    changed.add(pair)
                words[idx] = merged
            for pair in changed:
                if pairs[pair] > 0:
                    heapq.heappush(heap, (-pairs[pair], pair))
                else:
                    del pairs[pair]
        return cls(merges, vocab_size)

    def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        word = list(chunk.encode("utf-8"))
        ranks, unknown = self._ranks, len(self.merges)
        while len(word) > 1:
            # Lowest rank first reproduces the training-time segmentation: a merge's output id can
            # only take part in later merges, so no earlier-ranked pair can appear afterwards.
            rank, pair = min((ranks.get(p, unknown), p) for p in zip(word, word[1:]))
            if rank == unknown:
                break
            word = _merge(word, pair[0], pair[1], 256 + rank)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[chunk] = out = tuple(word)
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``normalize(text)``, without ``sot`` / ``eot``."""
        ids: list[int] = []
        for chunk in _chunks(text):
            ids.extend(self._encode_chunk(chunk))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; padding (0), specials and unused ids are skipped, bad UTF-8 is replaced."""
        table = self._bytes
        data = b"".join(table[i] for i in map(int, ids) if 0 < i < len(table))
        return data.decode("utf-8", errors="replace")

    def __call__(self, texts: str | Sequence[str], context_length: int) -> torch.Tensor:
        """``LongTensor [len(texts), context_length]``: ``sot, tokens, eot`` then 0-padding.

        A too-long text is cut so that the last position still holds ``eot`` (as open_clip does),
        because the CLIP text tower pools the features at the ``eot`` position.
        """
        if context_length < 2:
            raise ValueError(f"context_length must hold at least sot and eot, got {context_length}")
        if isinstance(texts, str):  # a bare string is one text, not a sequence of characters
            texts = [texts]
        rows = []
        for text in texts:
            tokens = [self.sot, *self.encode(text), self.eot][:context_length]
            tokens[-1] = self.eot
            rows.append(tokens + [0] * (context_length - len(tokens)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), context_length)

    def merges_tensor(self) -> torch.Tensor:
        """``LongTensor [vocab_size - 258, 2]`` of the merges; unused rows are -1 (for checkpoints)."""
        out = torch.full((self.vocab_size - 256 - _SPECIALS, 2), -1, dtype=torch.long)
        if self.merges:
            out[: len(self.merges)] = torch.tensor(self.merges, dtype=torch.long)
        return out

    @classmethod
    def from_merges_tensor(cls, merges: torch.Tensor) -> BPETokenizer:
        """Inverse of :meth:`merges_tensor`; ``vocab_size = rows + 258``."""
        if merges.dim() != 2 or merges.shape[1] != 2:
            raise ValueError(f"expected a [rows, 2] merges tensor, got shape {tuple(merges.shape)}")
        rows = [(int(a), int(b)) for a, b in merges.tolist()]
        used = next((i for i, (a, b) in enumerate(rows) if a == -1 and b == -1), len(rows))
        if any(r != (-1, -1) for r in rows[used:]):
            raise ValueError("unused (-1) merge rows must all come after the used ones")
        return cls(rows[:used], len(rows) + 256 + _SPECIALS)
