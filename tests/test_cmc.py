"""CMC: Lab conversion, the pairwise loss graph, per-view memory banks, extra views from shards, export."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from sslcli.augment import AugmentConfig, MultiView, ViewConfig, eval_transform
from sslcli.cli.app import app
from sslcli.colorspace import LAB_MEAN, LAB_STD, rgb_to_lab, to_input_space
from sslcli.config import build_config
from sslcli.data.reader import build_loader, resolve_source
from sslcli.data.shards import ShardWriter, sample_fields, sample_key, write_index
from sslcli.engine.memory_bank import MemoryBank
from sslcli.errors import UserError
from sslcli.evaluation import knn_evaluate, resolve_encoder
from sslcli.export import export_run
from sslcli.methods import get_method
from sslcli.engine.view_graph import pairwise_edges
from sslcli.evaluation.multiview import ConcatLabEncoder, concat_encoder
from sslcli.models.encoders import create_encoder
from sslcli.pretrain import pretrain

CMC = get_method("cmc")
AUG32 = AugmentConfig(views=[ViewConfig(count=1, size=32)])


# --- RGB -> Lab ------------------------------------------------------------------------------------------


def _lab_reference(rgb: np.ndarray) -> np.ndarray:
    """skimage.color.rgb2lab written out independently in numpy (float64), ``[..., 3]`` in [0, 1]."""
    linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    x, y, z = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([116.0 * y - 16.0, 500.0 * (x - y), 200.0 * (y - z)], axis=-1)


def test_lab_matches_the_skimage_formula_on_random_colours() -> None:
    rgb = np.random.default_rng(0).random((5, 7, 3))
    rgb[0, :3] = [[0, 0, 0], [1, 1, 1], [0.01, 0.02, 0.03]]  # black, white and the linear segments
    expected = _lab_reference(rgb)
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    got64 = rgb_to_lab(chw).permute(1, 2, 0).numpy()
    got32 = rgb_to_lab(chw.float()).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got64, expected, atol=1e-9)
    np.testing.assert_allclose(got32, expected, atol=2e-3)
    batched = rgb_to_lab(chw.float()[None].expand(4, -1, -1, -1))  # [B, 3, H, W] works as well
    assert batched.shape == (4, 3, 5, 7) and torch.allclose(batched[2], torch.from_numpy(got32).permute(2, 0, 1))


@pytest.mark.parametrize(("rgb", "lab"), [
    ((1, 1, 1), (100.0, 0.0, 0.0)),
    ((0, 0, 0), (0.0, 0.0, 0.0)),
    ((1, 0, 0), (53.241, 80.092, 67.203)),    # sRGB primaries under D65 (the values skimage gives)
    ((0, 1, 0), (87.735, -86.183, 83.179)),
    ((0, 0, 1), (32.297, 79.188, -107.860)),
    ((0.5, 0.5, 0.5), (53.389, 0.0, 0.0)),
])
def test_lab_of_known_colours(rgb: tuple, lab: tuple) -> None:
    got = rgb_to_lab(torch.tensor(rgb, dtype=torch.float64).view(3, 1, 1)).flatten()
    assert torch.allclose(got, torch.tensor(lab, dtype=torch.float64), atol=0.01), got


def test_cmc_normalisation_constants_are_the_lab_ranges_of_srgb() -> None:
    # CMC's mean/std map [min, max] of each channel over sRGB to [-1, 1]: green and magenta bound a,
    # yellow bounds b from above (its lower bound, -107.857, is blue's b to 3e-3).
    extremes = rgb_to_lab(torch.tensor([[0, 1, 0], [1, 0, 1], [1, 1, 0], [0, 0, 1]], dtype=torch.float64).T[:, :, None])
    a, b = extremes[1, :, 0], extremes[2, :, 0]
    assert a[0] == pytest.approx(-86.183, abs=1e-3) and a[1] == pytest.approx(98.233, abs=1e-3)
    assert b[2] == pytest.approx(94.478, abs=1e-3) and b[3] == pytest.approx(-107.857, abs=5e-3)
    assert LAB_MEAN[0] == 50 and LAB_STD[0] == 50
    assert LAB_MEAN[1] - LAB_STD[1] == pytest.approx(-86.183) and LAB_MEAN[2] + LAB_STD[2] == pytest.approx(94.478)


def test_input_spaces_and_the_evaluation_transform() -> None:
    rgb = torch.rand(2, 3, 4, 4)
    lab = rgb_to_lab(rgb)
    assert torch.equal(to_input_space(rgb, "rgb"), rgb)
    assert torch.allclose(to_input_space(rgb, "lab_l"), lab[:, :1])
    assert torch.allclose(to_input_space(rgb, "lab_ab"), lab[:, 1:])
    with pytest.raises(ValueError, match="unknown input space"):
        to_input_space(rgb, "hsv")
    image = Image.fromarray((np.random.default_rng(1).random((8, 8, 3)) * 255).astype(np.uint8))
    x = eval_transform(8, 1.0, [50.0], [50.0], input_space="lab_l")(image)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float64) / 255).permute(2, 0, 1)
    assert x.shape == (1, 8, 8)
    assert torch.allclose(x.double(), (rgb_to_lab(pixels)[:1] - 50) / 50, atol=1e-4)


# --- the method: views, loss graph, banks --------------------------------------------------------------


def test_views_are_the_normalised_l_and_ab_of_the_crop() -> None:
    method = CMC(create_encoder("resnet18"), num_samples=8, augment=AUG32, num_negatives=4)
    rgb = torch.rand(2, 3, 8, 8)
    normalised = (rgb - torch.tensor(AUG32.mean).view(1, 3, 1, 1)) / torch.tensor(AUG32.std).view(1, 3, 1, 1)
    l, ab = method.view_inputs([normalised])
    expected = (rgb_to_lab(rgb) - torch.tensor(LAB_MEAN).view(1, 3, 1, 1)) / torch.tensor(LAB_STD).view(1, 3, 1, 1)
    assert l.shape == (2, 1, 8, 8) and ab.shape == (2, 2, 8, 8)
    assert torch.allclose(l, expected[:, :1], atol=1e-4) and torch.allclose(ab, expected[:, 1:], atol=1e-4)
    assert [e.model.conv1.in_channels for e in method.encoders()] == [1, 2]
    assert method.export_metadata() == {"input_space": "lab_l", "mean": [50.0], "std": [50.0]}


def test_pairwise_edges_full_and_core() -> None:
    assert pairwise_edges(2, "full") == pairwise_edges(2, "core") == [(0, 1)]
    assert pairwise_edges(3, "full") == [(0, 1), (0, 2), (1, 2)]
    assert pairwise_edges(4, "full") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert pairwise_edges(3, "core", core=0) == [(0, 1), (0, 2)]
    assert pairwise_edges(3, "core", core=1) == [(1, 0), (1, 2)]


def _nce_reference(z: torch.Tensor, pos: torch.Tensor, noise: torch.Tensor, t: float, big_z: float, n: int) -> float:
    """InstDisc / CMC NCE by the definition, one sample and one noise row at a time."""
    m, total = noise.shape[0], 0.0
    for i in range(z.shape[0]):
        p = math.exp(float(z[i] @ pos[i]) / t) / big_z
        total -= math.log(p / (p + m / n))
        for row in noise:
            q = math.exp(float(z[i] @ row) / t) / big_z
            total -= math.log(1 - q / (q + m / n))
    return total / z.shape[0]


def _softmax_reference(z: torch.Tensor, pos: torch.Tensor, noise: torch.Tensor, t: float) -> float:
    total = 0.0
    for i in range(z.shape[0]):
        logits = [float(z[i] @ pos[i]) / t] + [float(z[i] @ row) / t for row in noise]
        total -= logits[0] - math.log(sum(math.exp(v) for v in logits))
    return total / z.shape[0]


@pytest.mark.parametrize("graph", ["full", "core"])
@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_loss_is_the_sum_over_the_graph_of_both_directions(graph: str, loss: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    n, k, t = 20, 6, 0.5
    method = CMC(create_encoder("resnet18"), num_samples=n, augment=AUG32, num_negatives=k, temperature=t, loss=loss,
                 graph=graph, core_view="ab", extra_views={"depth.png": 1}, dim=16)
    method.partition.copy_(torch.arange(9.0).view(3, 3) * n + n)  # a known Z per direction, not estimated
    noise_idx = torch.tensor([3, 17, 5, 5, 0, 11])
    monkeypatch.setattr(MemoryBank, "sample", lambda self, m, generator=None: noise_idx[:m])
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 1, 16, 16)]
    index = torch.tensor([2, 7, 11, 19])
    banks = [bank.memory.clone() for bank in method.banks]

    out = method(views, {"index": index})
    z = [f.detach() for f in method.embed(views)]  # train-mode BN: the same batch gives the same features
    edges = {"full": [(0, 1), (0, 2), (1, 2)], "core": [(1, 0), (1, 2)]}[graph]
    expected, names = 0.0, ["l", "ab", "depth.png"]
    for i, j in edges:
        edge = 0.0
        for a, b in ((i, j), (j, i)):
            pos, noise = banks[b][index], banks[b][noise_idx]
            edge += (_nce_reference(z[a], pos, noise, t, float(method.partition[a, b]), n) if loss == "nce"
                     else _softmax_reference(z[a], pos, noise, t))
        assert float(out.logs[f"loss_{names[i]}_{names[j]}"]) == pytest.approx(edge, rel=1e-4)
        expected += edge
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-4)
    assert len([key for key in out.logs if key.startswith("loss_")]) == len(edges)


def test_each_view_updates_its_own_bank_with_momentum() -> None:
    torch.manual_seed(0)
    method = CMC(create_encoder("resnet18"), num_samples=12, augment=AUG32, num_negatives=5, dim=8, bank_momentum=0.5,
                 extra_views={"depth.png": 1})
    views = [torch.randn(3, 3, 16, 16), torch.randn(3, 1, 16, 16)]
    index = torch.tensor([1, 4, 9])
    before = [bank.memory.clone() for bank in method.banks]
    method(views, {"index": index})
    z = [f.detach() for f in method.embed(views)]
    rest = torch.tensor([i for i in range(12) if i not in index.tolist()])
    for view, bank in enumerate(method.banks):
        assert torch.allclose(bank.memory[index], F.normalize(0.5 * before[view][index] + 0.5 * z[view], dim=1),
                              atol=1e-6)
        assert torch.equal(bank.memory[rest], before[view][rest])
        assert torch.allclose(bank.memory.norm(dim=1), torch.ones(12), atol=1e-5)
    # banks are not shared: the L bank did not take the ab features
    assert not torch.allclose(method.banks[0].memory[index], method.banks[1].memory[index])


def test_partition_is_estimated_once_per_direction() -> None:
    torch.manual_seed(0)
    method = CMC(create_encoder("resnet18"), num_samples=50, augment=AUG32, num_negatives=16, dim=8)
    views = [torch.randn(4, 3, 16, 16)]
    method(views, {"index": torch.arange(4)})
    z = method.partition.clone()
    assert z[0, 0] == z[1, 1] == -1 and z[0, 1] > 0 and z[1, 0] > 0  # directions l->ab and ab->l only
    method(views, {"index": torch.arange(4, 8)})
    assert torch.equal(method.partition, z)


def test_half_width_resnet_is_cmcs_split_and_loads_into_timm() -> None:
    method = CMC(create_encoder("resnet50"), num_samples=4, augment=AUG32, num_negatives=2, width=0.5)
    spec = method.backbone.spec
    assert spec.timm_kwargs == {"in_chans": 1, "channels": [32, 64, 128, 256]}
    assert method.backbone.dim == method.view_encoders[0].dim == 1024  # CMC's is_half: 256 * 4 each
    assert method.backbone.model.conv1.out_channels == 64  # the stem keeps its width, as in CMC
    kwargs = json.loads(json.dumps(spec.timm_kwargs))
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kwargs)
    model.load_state_dict(method.backbone.model.state_dict(), strict=True)


def test_bad_arguments_are_user_errors() -> None:
    enc = create_encoder("resnet18")
    cases = [({"graph": "star"}, "graph"), ({"loss": "mse"}, "loss"), ({"core_view": "depth"}, "core_view"),
             ({"extra_views": {"depth.png": 2}}, "extra_views"), ({"num_negatives": 0}, "num_negatives"),
             ({"augment": AugmentConfig(views=[ViewConfig(count=2)])}, "one crop")]
    for kwargs, match in cases:
        with pytest.raises(UserError, match=match):
            CMC(enc, num_samples=4, **kwargs)
    with pytest.raises(UserError, match="timm ResNet"):
        CMC(create_encoder("vit_tiny_p4", img_size=32), num_samples=4, width=0.5)


def test_recipe_has_the_papers_defaults() -> None:
    cfg = build_config("cmc")
    args = cfg.method_args
    assert (cfg.arch, cfg.epochs, cfg.batch_size) == ("resnet50", 240, 128)
    assert cfg.optim.scaled_lr(cfg.batch_size) == pytest.approx(0.03)
    assert (cfg.optim.schedule, cfg.optim.milestones, cfg.optim.weight_decay) == ("step", [120, 160, 200], 1e-4)
    assert (args["num_negatives"], args["temperature"], args["bank_momentum"], args["dim"]) == (16384, 0.07, 0.5, 128)
    assert (args["loss"], args["graph"], args["width"]) == ("nce", "full", 0.5)
    assert cfg.augment.num_views == 1 and cfg.augment.views[0].scale == (0.08, 1.0)
    assert cfg.augment.views[0].jitter_p == 0 and cfg.augment.views[0].gray_p == 0


# --- extra views from shard fields ---------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _gradient_sample(rng: np.random.Generator, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image whose red channel is a horizontal ramp and a 16-bit depth map holding the same ramp."""
    ramp = np.tile(np.linspace(0, 1, size), (size, 1))
    rgb = np.stack([ramp, rng.random((size, size)), rng.random((size, size))], axis=-1)
    return (rgb * 255).round().astype(np.uint8), (ramp * 65535).round().astype(np.uint16)


def write_depth_shards(out: Path, *, train: int = 16, test: int = 8, with_depth: bool = True) -> Path:
    """A labelled dataset whose samples carry ``png`` (RGB), ``depth.png`` (16-bit), ``cls`` and ``idx``."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True)
    splits = {}
    for split, count in (("train", train), ("test", test)):
        with ShardWriter(out, split, 10) as writer:
            for i in range(count):
                rgb, depth = _gradient_sample(rng)
                fields = sample_fields(_png(rgb), "png", index=i, label=i % 2)
                if with_depth:
                    fields["depth.png"] = _png(depth)
                writer.write(sample_key(split, i), fields)
            splits[split] = writer.close()
    write_index(out, classes=["even", "odd"], splits=splits)
    return out


def test_extra_field_gets_the_same_crop_and_flip_as_the_image(tmp_path: Path) -> None:
    data = write_depth_shards(tmp_path / "rgbd", train=12, test=2)
    cfg = AugmentConfig(views=[ViewConfig(count=2, size=12, scale=(0.2, 0.6), flip=0.5, jitter_p=0, gray_p=0,
                                          blur_p=0)], mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    views = MultiView(cfg, {"depth.png": 1})
    torch.manual_seed(0)
    loader = build_loader(resolve_source(data, "train"), views, batch_size=12, shuffle=True, seed=1)
    batch = next(iter(loader))
    rgb_views, depth_views = batch["views"][:2], batch["views"][2:]
    assert [v.shape for v in batch["views"]] == [(12, 3, 12, 12)] * 2 + [(12, 1, 12, 12)] * 2
    flips = 0
    for rgb, depth in zip(rgb_views, depth_views):
        red, depth01 = rgb[:, 0], depth[:, 0] * 0.5 + 0.5  # extras are normalised as (x - 0.5) / 0.5
        assert (red - depth01).abs().max() < 0.03  # same region, same flip (a ramp reversed is off by ~1)
        flips += int((red[:, 0, -1] < red[:, 0, 0]).sum())  # a flipped ramp decreases
    assert 0 < flips < 24  # some crops were flipped, some not: the flip really was drawn per sample


def test_missing_extra_field_and_image_folder_are_user_errors(tmp_path: Path) -> None:
    data = write_depth_shards(tmp_path / "rgb", train=4, test=2, with_depth=False)
    views = MultiView(AUG32, {"depth.png": 1})
    with pytest.raises(UserError, match="has no 'depth.png' field"):
        next(iter(build_loader(resolve_source(data, "train"), views, batch_size=2, shuffle=False)))
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    with pytest.raises(UserError, match="image folder"):
        build_loader(resolve_source(folder, "train"), views, batch_size=1, shuffle=False)


def test_cmc_trains_on_shards_with_depth_exports_and_evaluates(tmp_path: Path) -> None:
    data = write_depth_shards(tmp_path / "rgbd")
    options = {"arch": "resnet18", "epochs": 1, "batch_size": 8, "num_workers": 0, "data": str(data)}
    cfg = build_config("cmc", "small", options, ["log_every=1", "method_args.num_negatives=32",
                                                  "method_args.extra_views={depth.png: 1}"])
    run = pretrain(cfg, tmp_path / "run", device="cpu")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    assert {"loss_l_ab", "loss_l_depth.png", "loss_ab_depth.png"} <= set(records[0])

    # The exported L encoder loads into timm from its metadata alone, and says which input it expects.
    exported = export_run(run, tmp_path / "cmc-l.safetensors")
    for path in (run / "encoder.safetensors", exported):
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
        assert meta["input_space"] == "lab_l" and json.loads(meta["mean"]) == [50.0]
        assert json.loads(meta["timm_kwargs"]) == {"in_chans": 1}
        model = timm.create_model(meta["timm_name"], pretrained=False, num_classes=0, **json.loads(meta["timm_kwargs"]))
        model.load_state_dict(load_file(str(path)), strict=True)
    assert torch.equal(load_file(str(exported))["conv1.weight"],
                       load_file(str(run / "encoder.safetensors"))["conv1.weight"])

    # `sslcli knn RUN` feeds the encoder the L channel; the random-init baseline copies that preprocessing.
    encoder, info = resolve_encoder(run, arch=None, random_init=False, image_size=None)
    assert info.input_space == "lab_l" and info.transform()(Image.new("RGB", (24, 24))).shape == (1, 32, 32)
    for extra in ([], ["--random-init"]):
        result = CliRunner().invoke(app, ["knn", str(run), "--data", str(data), "--k", "3", "--device", "cpu",
                                          "--out", str(tmp_path / "knn.json"), *extra])
        assert result.exit_code == 0, result.output
        assert 0 <= json.loads((tmp_path / "knn.json").read_text())["metrics"]["top1"] <= 1

    # CMC's own evaluation input: L and ab features concatenated.
    both, transform = concat_encoder(run)
    assert isinstance(both, ConcatLabEncoder) and both.dim == 1024
    source = resolve_source(data, "train")
    metrics = knn_evaluate(both, source, resolve_source(data, "test"), transform, k=3, batch_size=8)
    assert 0 <= metrics["top1"] <= 1
