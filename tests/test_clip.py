"""CLIP: the symmetric loss against explicit loops, the local-loss split, the logit-scale clamp, the text
tower's [EOS] pooling, and the tokenizer travelling in the state dict."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sslcli.data.captions import iter_captions
from sslcli.data.reader import resolve_source
from sslcli.errors import UserError
from sslcli.losses.clip import clip_loss
from sslcli.methods import build_method
from sslcli.models.encoders import create_encoder
from sslcli.models.text import TextTransformer

TINY = {"embed_dim": 16, "vocab_size": 300, "context_length": 16, "text_width": 32, "text_layers": 2, "text_heads": 2}
CAPTIONS = ["a small red circle on a plain blue background", "two large green squares on a noisy red background",
            "three small blue stars on a white gradient background"] * 20


def _pairs(n: int = 6, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1), F.normalize(torch.randn(n, d, generator=g), dim=1)


def _clip(captions: list[str] | None = CAPTIONS, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_method("clip", create_encoder("resnet18"), {**TINY, **overrides},
                        captions=None if captions is None else (lambda: iter(captions)))


def test_loss_matches_explicit_loops() -> None:
    image, text = _pairs()
    scale = 7.5
    total = 0.0
    for i in range(6):
        image_row = [math.exp(scale * float(image[i] @ text[j])) for j in range(6)]
        text_row = [math.exp(scale * float(text[i] @ image[j])) for j in range(6)]
        total += -math.log(image_row[i] / sum(image_row)) - math.log(text_row[i] / sum(text_row))
    assert clip_loss(image, text, scale).item() == pytest.approx(total / 12, rel=1e-5)


def test_local_loss_splits_the_global_loss_and_its_gradient() -> None:
    image, text = (x.requires_grad_() for x in _pairs(8))
    clip_loss(image, text, 10.0).backward()
    global_grads = image.grad.clone(), text.grad.clone()
    image.grad = text.grad = None
    # Two "ranks" of 4 rows, each scoring its rows against the whole batch; their mean is the global loss.
    parts = [clip_loss(image[r * 4:(r + 1) * 4], text[r * 4:(r + 1) * 4], 10.0, image_keys=image, text_keys=text,
                       offset=r * 4) for r in range(2)]
    assert (sum(parts) / 2).item() == pytest.approx(clip_loss(image, text, 10.0).item(), rel=1e-6)
    (sum(parts) / 2).backward()
    assert torch.allclose(image.grad, global_grads[0], atol=1e-6)
    assert torch.allclose(text.grad, global_grads[1], atol=1e-6)


def test_matching_pairs_score_lower_than_shuffled_ones() -> None:
    image, _ = _pairs()
    assert clip_loss(image, image, 20.0) < clip_loss(image, image.roll(1, 0), 20.0)


def test_logit_scale_starts_at_one_over_0_07_and_is_clamped_at_100() -> None:
    clip = _clip()
    assert clip.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(500.0))
    clip.after_step(0.5)
    assert clip.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-6)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(20.0))
    clip.after_step(0.5)  # inside the range: untouched
    assert clip.logit_scale.exp().item() == pytest.approx(20.0, rel=1e-6)


def test_text_tower_pools_the_eot_token_and_ignores_what_follows() -> None:
    torch.manual_seed(0)
    tower = TextTransformer(50, eot=49, context_length=10, width=16, layers=2, heads=2, embed_dim=8).eval()
    tokens = torch.tensor([[48, 5, 6, 7, 49, 0, 0, 0, 0, 0]])
    base = tower(tokens)
    after = tokens.clone()
    after[0, 5:] = torch.tensor([3, 4, 9, 9, 1])  # past eot: causal attention never lets it reach eot
    assert torch.allclose(tower(after), base, atol=1e-6)
    before = tokens.clone()
    before[0, 2] = 11
    assert not torch.allclose(tower(before), base, atol=1e-4)


def test_training_step_learns_the_batch() -> None:
    clip = _clip()
    images = torch.randn(3, 3, 32, 32)
    optimizer = torch.optim.Adam(clip.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = clip([images], {"text": CAPTIONS[:3]}).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        clip.after_step(0.0)
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_tokenizer_is_learnt_from_the_captions_and_travels_in_the_state_dict() -> None:
    trained = _clip(context_length=64)
    assert (trained.merges[:, 0] >= 0).sum() > 10  # whole words of the captions became tokens
    # A run rebuilt from its checkpoint has no captions: the merges come from the state dict.
    rebuilt = _clip(captions=None, context_length=64)
    assert (rebuilt.merges == -1).all()
    rebuilt.load_state_dict(trained.state_dict())
    texts = ["a small red circle", "a hexagon in ünïcode 🙂"]
    assert torch.equal(rebuilt.tokenize(texts), trained.tokenize(texts))
    assert rebuilt.tokenizer.decode(rebuilt.tokenize(texts)[1].tolist()) == texts[1].lower()


def test_captions_come_from_shards_only(tmp_path: Path) -> None:
    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(folder / "a.png")
    with pytest.raises(UserError, match="no captions"):
        list(iter_captions(resolve_source(str(tmp_path / "images"), "train")))


def test_captions_are_read_from_the_txt_field(synth_data: Path) -> None:
    captions = list(iter_captions(resolve_source(str(synth_data), "train"), limit=5))
    assert len(captions) == 5 and all(" on " in c and "background" in c for c in captions)
