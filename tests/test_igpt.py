"""Image GPT: the palette quantisation, the causal mask, both objectives, the fitted palette and --layer."""

import pytest
import torch
import torch.nn.functional as F

from sslcli.config import build_config
from sslcli.errors import UserError
from sslcli.methods.base import build_method
from sslcli.models.encoders import create_encoder
from sslcli.models.igpt import ImageGPT, dequantize, image_to_pixels, quantize


def tiny(**kwargs: object) -> ImageGPT:
    torch.manual_seed(0)
    model = ImageGPT(**{"vocab": 16, "seq_size": 4, "width": 32, "depth": 3, "heads": 4, **kwargs})
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # zero at init: every logit would be equal
    return model


def test_quantize_picks_the_nearest_colour_and_round_trips() -> None:
    torch.manual_seed(0)
    palette = torch.rand(16, 3) * 2 - 1
    pixels = torch.rand(5, 7, 3) * 2 - 1
    reference = torch.cdist(pixels.view(-1, 3), palette).argmin(1).view(5, 7)  # brute force
    assert torch.equal(quantize(pixels, palette), reference)
    tokens = torch.randint(16, (4, 9))
    assert torch.equal(quantize(dequantize(tokens, palette), palette), tokens)  # token -> colour -> same token
    nudged = dequantize(tokens, palette) + 1e-4 * torch.randn(4, 9, 3)
    assert torch.allclose(dequantize(quantize(nudged, palette), palette), dequantize(tokens, palette))


def test_pixels_are_area_averaged_in_raster_order() -> None:
    image = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 3, 4, 4)
    pixels = image_to_pixels(image, 2)
    assert pixels.shape == (1, 4, 3)
    assert torch.equal(pixels[0, :, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]))  # means of the 2 x 2 blocks


def test_causal_model_sees_no_future_tokens() -> None:
    model = tiny().eval()
    tokens = torch.randint(16, (2, 16))
    changed = tokens.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 16
    with torch.no_grad():
        before, _ = model.logits(model.inputs(tokens))
        after, _ = model.logits(model.inputs(changed))
    # logits at i predict token i from tokens < i: positions 0..9 never read tokens 9.. (the input is shifted right)
    assert torch.equal(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])
    assert torch.equal(model.inputs(tokens)[:, 0], torch.full((2,), model.start_token))


def test_bidirectional_model_reads_the_whole_sequence() -> None:
    model = tiny(causal=False).eval()
    tokens = torch.randint(16, (2, 16))
    changed = tokens.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 16
    with torch.no_grad():
        assert not torch.allclose(model.logits(tokens)[0][:, 0], model.logits(changed)[0][:, 0])


def test_losses_are_the_objectives_formulas() -> None:
    encoder = create_encoder("igpt_tiny")
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    ar = build_method("igpt", encoder, {"objective": "ar", "resolution": 16})
    torch.nn.init.normal_(ar.gpt.lm_head.weight, std=0.02)
    tokens = ar.gpt.tokens(images)
    logits, _ = ar.gpt.logits(torch.cat([torch.full((3, 1), ar.gpt.vocab), tokens[:, :-1]], 1))
    expected = F.cross_entropy(logits.reshape(-1, ar.gpt.vocab), tokens.reshape(-1))
    assert torch.allclose(ar([images], {}).loss, expected, atol=1e-5)

    bert = build_method("igpt", create_encoder("igpt_tiny"), {"objective": "bert", "mask_prob": 0.15, "resolution": 16})
    assert not bert.gpt.causal
    torch.nn.init.normal_(bert.gpt.lm_head.weight, std=0.02)
    torch.manual_seed(3)
    loss = bert([images], {}).loss
    torch.manual_seed(3)
    masked = torch.rand(tokens.shape) < 0.15
    masked[:, 0] |= ~masked.any(1)
    assert 0.05 < masked.float().mean() < 0.3
    logits, _ = bert.gpt.logits(tokens.masked_fill(masked, bert.gpt.vocab))
    assert torch.allclose(loss, F.cross_entropy(logits[masked], tokens[masked]), atol=1e-5)


def test_palette_is_fitted_by_kmeans_once_before_training() -> None:
    colours = torch.tensor([[-0.8, -0.8, -0.8], [0.9, -0.5, 0.1], [0.0, 0.7, -0.9], [0.6, 0.6, 0.6]])
    # 40 images, each of 4 flat quadrants with the 4 colours in a random arrangement
    images = torch.stack([colours[torch.randperm(4)].T.reshape(3, 2, 2).repeat_interleave(8, 1).repeat_interleave(8, 2)
                          for _ in range(40)])
    method = build_method("igpt", create_encoder("igpt_tiny"), {"palette_size": 4, "resolution": 4,
                                                                "palette_pixels_per_image": 8})
    assert (method.gpt.vocab, method.gpt.seq_size, method.backbone.spec.timm_kwargs["vocab"]) == (4, 4, 4)
    calls = []

    def dataset_features(module: torch.nn.Module) -> torch.Tensor:
        calls.append(1)
        return module(images)

    method.before_epoch(0, dataset_features)
    palette = method.gpt.palette
    assert torch.allclose(palette[quantize(colours, palette)], colours, atol=1e-6)  # every colour is a centroid
    method.before_epoch(1, dataset_features)
    assert len(calls) == 1 and bool(method.palette_fitted)  # fitted once; a checkpoint carries the flag


def test_layer_selects_the_pooled_block() -> None:
    encoder = create_encoder("igpt_tiny").eval()
    images = torch.rand(2, 3, 16, 16)
    assert encoder.model.feature_layer == 2  # the middle of 4 blocks, the paper's best probe
    with torch.no_grad():
        middle = encoder(images)
        encoder.select_layer(4)
        last = encoder(images)
        expected = F.layer_norm(encoder.model.hidden(encoder.model.inputs(encoder.model.tokens(images))), (128,))
    assert torch.allclose(last, expected.mean(1), atol=1e-6) and not torch.allclose(middle, last)
    with pytest.raises(UserError, match="choose 1..4"):
        encoder.select_layer(5)


def test_igpt_refuses_another_backbone() -> None:
    with pytest.raises(UserError, match="--arch igpt_s"):
        build_method("igpt", create_encoder("resnet18"), {})


def test_small_recipe_keeps_the_paper_objective_with_a_small_palette() -> None:
    paper, small = build_config("igpt"), build_config("igpt", "small")
    assert paper.method_args["palette_size"] == 512 and paper.method_args["resolution"] == 32
    assert small.arch == "igpt_tiny" and small.method_args["objective"] == paper.method_args["objective"] == "ar"
    # 32 colours, 8 epochs: where pretraining was measured to help a fine-tune (docs/methods/masked-modelling.md)
    assert small.method_args["palette_size"] == 32 and small.method_args["resolution"] == 16 and small.epochs == 8
