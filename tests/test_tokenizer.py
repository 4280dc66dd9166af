"""Byte-level BPE tokenizer: round trips, byte fallback, learnt words, capacity, batching, the merges
tensor, and agreement with a naive textbook BPE."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from sslcli.models.tokenizer import BPETokenizer, normalize

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "cross", "heart", "ring"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SIZES = ["small", "large", "tiny", "huge"]
BACKGROUNDS = ["plain", "striped", "dotted", "noisy"]
PLACES = ["on", "near", "above", "below"]

UNSEEN = [
    "ünïcode 🙂 漢字",
    "Room 101, floor 3.5 -- 42%!",
    "snake_case_name and __dunder__",
    "  Mixed\tCASE\n\nwhitespace\u3000and\xa0nbsp  ",
    "çà et là: l'été, ñandú; Привет мир; مرحبا",
    "e\u0301 vs \u00e9, zwj 👩\u200d👩\u200d👧, flags 🇫🇷",
    "nul\x00byte",
    "",
    "   ",
]


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"A {rng.choice(SIZES)} {rng.choice(COLORS)} {rng.choice(SHAPES)} {rng.choice(PLACES)} "
            f"a {rng.choice(BACKGROUNDS)} {rng.choice(COLORS)} background" for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(captions(400), vocab_size=1024)


def test_normalize() -> None:
    assert normalize("  A Small\t\tRED\n circle  ") == "a small red circle"
    assert normalize("a\x00b") == "ab"  # NUL is dropped so that id 0 can only mean padding
    assert normalize("") == ""


def test_round_trip_training_and_unseen_text(tok: BPETokenizer) -> None:
    for text in captions(50, seed=1) + UNSEEN:
        ids = tok.encode(text)
        assert tok.decode(ids) == normalize(text), text
        assert all(0 < i < tok.sot for i in ids)  # no padding id, no specials inside encode


def test_unseen_characters_fall_back_to_utf8_bytes(tok: BPETokenizer) -> None:
    assert tok.encode("é") == [0xC3, 0xA9]
    for text in ["🙂", "漢字", "ñ"]:
        assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode([0xC3]) == "\ufffd"  # a cut multi-byte character is replaced, not an error
    # An untrained tokenizer is plain UTF-8.
    assert BPETokenizer([], 258).encode("Ünï 🙂") == list("ünï 🙂".encode("utf-8"))


def test_training_learns_frequent_whole_words(tok: BPETokenizer) -> None:
    # normalize() strips the text, so a leading-space word is looked at inside a caption.
    caption = "a small red circle on a plain blue background"
    ids = tok.encode(caption)
    pieces = [tok.decode([i]) for i in ids]
    for word in [" small", " circle", " background"]:
        assert word in pieces, pieces
    assert len(tok.encode("a triangle")) == 2  # "a", " triangle"
    assert len(ids) <= 10 < len(caption.encode("utf-8")) // 4
    # A rare word is still encodable, just in more pieces.
    assert len(tok.encode(" zebra")) > 1


def test_merges_are_deterministic_and_respect_capacity() -> None:
    texts = captions(300)
    first = BPETokenizer.train(texts, 600)
    assert BPETokenizer.train(texts, 600).merges == first.merges
    assert BPETokenizer.train(list(reversed(texts)), 600).merges == first.merges  # input order is irrelevant
    assert all(a < 256 + i and b < 256 + i for i, (a, b) in enumerate(first.merges))

    tiny = BPETokenizer.train(texts, 261)
    assert len(tiny.merges) == 3 and tiny.merges == first.merges[:3]
    assert (tiny.vocab_size, tiny.sot, tiny.eot) == (261, 259, 260)
    assert BPETokenizer.train(texts, 258).merges == []
    with pytest.raises(ValueError):
        BPETokenizer.train(texts, 257)
    # Training stops once no pair occurs twice, however large the capacity.
    assert BPETokenizer.train(["abc"], 1000).merges == []
    assert BPETokenizer.train(["ab xy ab"], 1000).merges == [(97, 98)]


def test_constructor_validates_merges() -> None:
    with pytest.raises(ValueError):
        BPETokenizer([(97, 98)], 258)  # no room
    with pytest.raises(ValueError):
        BPETokenizer([(97, 257)], 300)  # refers to an id defined later
    with pytest.raises(ValueError):
        BPETokenizer([(97, -1)], 300)


def test_call_pads_and_truncates(tok: BPETokenizer) -> None:
    texts = ["a red circle", "", "a huge striped purple hexagon below a noisy black background " * 4]
    out = tok(texts, context_length=16)
    assert out.shape == (3, 16) and out.dtype == torch.long
    assert (out[:, 0] == tok.sot).all()

    ids = tok.encode(texts[0])
    assert out[0, 1:1 + len(ids)].tolist() == ids
    assert out[0, 1 + len(ids)] == tok.eot
    assert (out[0, 2 + len(ids):] == 0).all()
    assert out[1, :2].tolist() == [tok.sot, tok.eot] and (out[1, 2:] == 0).all()

    long_ids = tok.encode(texts[2])
    assert len(long_ids) > 16
    assert out[2, 1:15].tolist() == long_ids[:14] and out[2, -1] == tok.eot
    assert (out == tok.eot).sum() == 3  # exactly one eot per row

    assert tok.decode(out[0].tolist()) == normalize(texts[0])  # specials and padding skipped
    assert tok("a red circle", 8).shape == (1, 8)  # a bare string is one text
    assert tok([], 8).shape == (0, 8)
    assert tok(["abc"], 2).tolist() == [[tok.sot, tok.eot]]
    with pytest.raises(ValueError):
        tok(["abc"], 1)


def test_merges_tensor_round_trip(tok: BPETokenizer) -> None:
    tensor = tok.merges_tensor()
    assert tensor.shape == (tok.vocab_size - 258, 2) and tensor.dtype == torch.long
    assert 0 < len(tok.merges) < tensor.shape[0]  # there are unused rows to check
    assert (tensor[len(tok.merges):] == -1).all()
    assert (tensor[: len(tok.merges)] >= 0).all()

    back = BPETokenizer.from_merges_tensor(tensor)
    assert (back.vocab_size, back.sot, back.eot) == (tok.vocab_size, tok.sot, tok.eot)
    assert back.merges == tok.merges
    texts = captions(20, seed=3) + UNSEEN
    assert torch.equal(back(texts, 24), tok(texts, 24))

    bad = tensor.clone()
    bad[0] = -1  # a hole before used rows
    with pytest.raises(ValueError):
        BPETokenizer.from_merges_tensor(bad)
    with pytest.raises(ValueError):
        BPETokenizer.from_merges_tensor(tensor[:, :1])


def naive_bpe(texts: list[str], capacity: int) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """Textbook BPE over space-separated words (leading space kept, as GPT-2), recounting every pair
    of every word occurrence from scratch at each step."""
    words: list[list[int]] = []
    for text in texts:
        parts = text.split(" ")
        words += [list(w.encode()) for w in parts[:1]] + [list((" " + w).encode()) for w in parts[1:]]
    merges: list[tuple[int, int]] = []
    while len(merges) < capacity:
        counts = Counter(pair for word in words for pair in zip(word, word[1:]))
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        if counts[best] < 2:
            break
        new = 256 + len(merges)
        merges.append(best)
        for k, word in enumerate(words):
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == list(best):
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[k] = out
    return merges, words


@pytest.mark.parametrize("capacity", [5, 40, 500])
def test_matches_naive_reference_bpe(capacity: int) -> None:
    # Lower-case letters and single spaces only, so the reference's split equals the chunk regex;
    # repeated letters exercise overlapping pairs ("aaaa").
    rng = random.Random(capacity)
    vocab = ["aaaa", "aaa", "abab", "banana", "bandana", "nab", "ban", "cab", "abba", "baa", "ab"]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 6))) for _ in range(60)]
    expected, segmented = naive_bpe(texts, capacity)
    tok = BPETokenizer.train(texts, capacity + 258)
    assert tok.merges == expected
    # Encoding by merge rank reproduces the training-time segmentation.
    flat = [i for word in segmented for i in word]
    assert [i for text in texts for i in tok.encode(text)] == flat
