"""Which encoder to evaluate, and its frozen features over a whole dataset split.

An evaluation compares representations, so the encoder can come from three places:

- trained weights: a run directory (``RUN/encoder.safetensors``) or an exported ``.safetensors``
  file, evaluated with the preprocessing recorded in its metadata;
- ``--random-init``: the same architecture with random (seeded) weights, the baseline every
  self-supervised method must beat;
- ``--raw-pixels``: no network at all, the flattened normalised image (:class:`PixelEncoder`).

With a source, ``--random-init`` and ``--raw-pixels`` keep the source's preprocessing (image
size, crop, normalisation), so the baseline numbers are directly comparable with the trained
encoder's.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import timm
import torch
from torch import nn

from sslcli.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from sslcli.colorspace import INPUT_SPACES
from sslcli import distributed as dist
from sslcli.data.reader import DataSource, Loader, build_loader
from sslcli.engine.metrics import track
from sslcli.errors import UserError
from sslcli.export import load_encoder, read_metadata
from sslcli.models.encoders import Encoder, EncoderSpec, create_encoder

if TYPE_CHECKING:
    from sslcli.evaluation.feature_cache import FeatureCache

WEIGHTS_NAME = "encoder.safetensors"
DEFAULT_IMAGE_SIZE = 224
DEFAULT_CROP_PCT = 0.875  # the ImageNet protocol; runs on small images record their own (1.0)

_SOURCE_HELP = (
    "pass a run directory, an exported .safetensors file, --arch NAME --random-init, "
    "or --raw-pixels --image-size N"
)


class PixelEncoder(nn.Module):
    """The raw-pixel baseline: the normalised image flattened to ``C * H * W`` features."""

    def __init__(self, image_size: int, channels: int = 3) -> None:
        super().__init__()
        self.image_size = image_size
        self.dim: int = channels * image_size * image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


@dataclass(frozen=True)
class EncoderInfo:
    """What was evaluated and with which preprocessing; written into every results file."""

    name: str
    kind: Literal["weights", "random_init", "raw_pixels"]
    arch: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    path: str | None = None
    run_dir: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    input_space: str = "rgb"  # what the encoder takes (sslcli.colorspace), e.g. lab_l for CMC
    layer: int | None = None  # the pooled block (--layer); None: the encoder's default

    def transform(self) -> Callable[[Any], torch.Tensor]:
        """The deterministic evaluation transform (resize, centre crop, colour space, normalise)."""
        return eval_transform(self.image_size, self.crop_pct, self.mean, self.std, self.input_space)


@dataclass(frozen=True)
class LabelledFeatures:
    """Frozen features of a train and a test split with labels in ``[0, num_classes)``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int


def _weights_path(source: Path) -> tuple[Path, Path | None]:
    """(weights file, run directory or None) for a run directory or a .safetensors file."""
    if source.is_dir():
        weights = source / WEIGHTS_NAME
        if weights.is_file():
            return weights, source
        if (source / "config.yaml").is_file():
            raise UserError(
                f"run '{source}' has no {WEIGHTS_NAME} yet (it is written at the end of every epoch); "
                "wait for the first epoch to finish or pass another run"
            )
        raise UserError(f"directory '{source}' is not a run directory (no {WEIGHTS_NAME}); {_SOURCE_HELP}")
    if not source.exists():
        raise UserError(f"'{source}' does not exist; {_SOURCE_HELP}")
    if source.suffix != ".safetensors":
        raise UserError(f"'{source}' is neither a run directory nor a .safetensors file; {_SOURCE_HELP}")
    return source, None


def _built_input_size(spec: EncoderSpec) -> int | None:
    """The input size a fixed-size model (ViT, ...) was built for; None when any size works."""
    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    if cfg is None or not cfg.fixed_input_size or spec.timm_kwargs.get("dynamic_img_size"):
        return None
    size = spec.timm_kwargs.get("img_size", cfg.input_size[-1])
    return int(size if isinstance(size, int) else size[-1])


def _check_size_fits(spec: EncoderSpec, image_size: int) -> None:
    built = _built_input_size(spec)
    if built is not None and built != image_size:
        raise UserError(
            f"{spec.arch} was built for {built} px inputs, not {image_size}; drop --image-size or pass {built}"
        )


def _seeded_encoder(arch: str, image_size: int, seed: int, metadata: dict[str, str]) -> Encoder:
    """Random weights; with a source's metadata, exactly its architecture (timm name and kwargs)."""
    # A private RNG stream: the baseline is reproducible without reseeding the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if not metadata:
            return create_encoder(arch, image_size)
        spec = EncoderSpec(arch=arch, timm_name=metadata["timm_name"], timm_kwargs=json.loads(metadata["timm_kwargs"]))
        _check_size_fits(spec, image_size)
        return Encoder(spec)


def resolve_encoder(
    source: str | Path | None,
    *,
    arch: str | None,
    random_init: bool,
    image_size: int | None,
    seed: int = 0,
    raw_pixels: bool = False,
    crop_pct: float | None = None,
    layer: int | None = None,
) -> tuple[Encoder | PixelEncoder, EncoderInfo]:
    """Builds the encoder to evaluate and describes it.

    ``source`` (run directory or ``.safetensors``) gives weights and preprocessing;
    ``arch`` must match its architecture when both are given.  ``random_init`` replaces the
    weights with random ones seeded by ``seed`` (``arch`` required without a source);
    ``raw_pixels`` replaces the network by :class:`PixelEncoder`.  ``image_size`` and
    ``crop_pct`` override the source's preprocessing (defaults without a source: 224 px,
    crop 0.875, ImageNet mean/std).  ``layer`` pools an intermediate block's output (Image GPT).
    Every bad combination raises :class:`UserError`.
    """
    if random_init and raw_pixels:
        raise UserError("--random-init and --raw-pixels are two different baselines; pass only one")
    if raw_pixels and layer is not None:
        raise UserError("--raw-pixels uses no network, so --layer does not apply; drop one of them")
    if raw_pixels and arch is not None:
        raise UserError("--raw-pixels uses no network, so --arch does not apply; drop one of them")
    if image_size is not None and image_size < 1:
        raise UserError(f"--image-size must be a positive number of pixels, got {image_size}")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise UserError(f"--crop-pct must be in (0, 1], got {crop_pct}")

    metadata: dict[str, str] = {}
    weights: Path | None = None
    run_dir: Path | None = None
    if source is not None:
        weights, run_dir = _weights_path(Path(source))
        metadata = read_metadata(weights)
        if arch is not None and arch != metadata["arch"]:
            # load_encoder raises the same message; checking first avoids building a model for nothing.
            load_encoder(weights, expect_arch=arch)
    elif raw_pixels:
        if image_size is None:
            raise UserError("--raw-pixels needs --image-size (the resolution to compare at) or a SOURCE to copy it from")
    elif not random_init:
        raise UserError(f"no encoder to evaluate; {_SOURCE_HELP}")
    elif arch is None:
        raise UserError("--random-init needs --arch NAME (or a SOURCE whose architecture to copy)")

    size = image_size or int(metadata.get("image_size", DEFAULT_IMAGE_SIZE))
    mean = tuple(json.loads(metadata["mean"])) if "mean" in metadata else IMAGENET_MEAN
    std = tuple(json.loads(metadata["std"])) if "std" in metadata else IMAGENET_STD
    crop = crop_pct if crop_pct is not None else float(metadata.get("eval_crop_pct", DEFAULT_CROP_PCT))
    input_space = metadata.get("input_space", "rgb")
    if input_space not in INPUT_SPACES:
        raise UserError(f"'{weights}' expects input space '{input_space}', unknown to this sslcli; upgrade sslcli")
    describe = functools.partial(
        EncoderInfo, image_size=size, mean=mean, std=std, crop_pct=crop, metadata=metadata, input_space=input_space,
        path=None if weights is None else str(weights), run_dir=None if run_dir is None else str(run_dir), layer=layer,
    )
    origin = f" with the preprocessing of {source}" if source is not None else ""

    if raw_pixels:
        pixels = PixelEncoder(size, channels=len(mean))
        return pixels, describe(name=f"raw pixels ({size} px){origin}", kind="raw_pixels", arch="raw_pixels")
    at_layer = "" if layer is None else f", layer {layer}"
    if random_init:
        name = arch or metadata["arch"]
        encoder = _seeded_encoder(name, size, seed, metadata)
        if layer is not None:
            encoder.select_layer(layer)
        return encoder, describe(name=f"{name}, random init (seed {seed}){at_layer}{origin}", kind="random_init",
                                 arch=name)
    assert weights is not None
    encoder, _ = load_encoder(weights, expect_arch=arch)
    _check_size_fits(encoder.spec, size)
    if layer is not None:
        encoder.select_layer(layer)
    label = f"{metadata.get('method', '?')}, {metadata.get('epochs', '?')} epochs{at_layer}"
    return encoder, describe(name=f"{source} ({label})", kind="weights", arch=metadata["arch"])


def extract_features(
    encoder: nn.Module,
    source: DataSource,
    transform: Callable[[Any], torch.Tensor],
    *,
    batch_size: int,
    device: torch.device | str,
    num_workers: int = 0,
    cache: FeatureCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[N, D]`` (float32, CPU) and labels ``[N]`` of every sample of ``source``.

    The encoder runs in eval mode under ``torch.inference_mode()`` (its training flag is
    restored afterwards) and is moved to ``device``.  Rows follow the sample index, so the
    result does not depend on batch size or loader workers; each sample appears exactly once
    (undecodable images are replaced by the loader, which warns about them).  With a ``cache``
    (:func:`sslcli.evaluation.feature_cache.feature_cache_for`, made for this encoder's
    preprocessing) a valid entry is returned without running the encoder, else one is written.
    Under torchrun each rank encodes a disjoint share and every rank returns the whole, gathered split.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if source.num_samples == 0:
        raise UserError("the dataset split has no samples; check --data and the split names")
    if cache is not None:
        return cache.fetch(encoder, source, lambda: extract_features(
            encoder, source, transform, batch_size=batch_size, device=device, num_workers=num_workers))
    loaders = rank_loaders(source, transform, batch_size=batch_size, num_workers=num_workers)
    was_training = encoder.training
    encoder.eval().to(device)
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            batches = sum(len(loader) for loader in loaders)
            for batch in track((batch for loader in loaders for batch in loader), batches, "features"):
                x = batch["image"].to(device, non_blocking=True)
                feats.append(encoder(x).flatten(1).float().cpu())
                labels.append(torch.as_tensor(batch["label"]).long().cpu())
                indices.append(torch.as_tensor(batch["index"]).long().cpu())
    finally:
        encoder.train(was_training)
    all_feats, all_labels, index = gather_shares(feats, labels, indices, source.num_samples)
    # A loader that dropped or added samples would silently bias every metric.
    if index.numel() != source.num_samples:
        raise RuntimeError(f"the loader yielded {index.numel()} samples for a split of {source.num_samples}")
    # Stable, so an undecodable image's stand-in (which repeats its neighbour's index) stays put.
    order = torch.sort(index, stable=True).indices
    return all_feats[order], all_labels[order]


def rank_loaders(source: DataSource, transform: Callable[[Any], torch.Tensor], *, batch_size: int,
                  num_workers: int) -> list[Loader]:
    """This rank's share of the split in stream order: every sample once across ranks.

    The loader gives each of ``W`` ranks ``N // W`` samples (stream positions ``rank, rank + W, ...``);
    the last ``N % W`` positions are spread one per rank, each read by a loader of world size ``N`` whose
    rank ``p`` holds exactly position ``p``.  That re-reads the stream (never decoding skipped samples),
    which the sample split does on every rank anyway.
    """
    world, rank = dist.world_size(), dist.rank()
    share = source.num_samples // world
    loaders = [] if share == 0 else [build_loader(source, transform, batch_size=batch_size, shuffle=False,
                                                  drop_last=False, num_workers=num_workers, rank=rank,
                                                  world_size=world)]
    position = world * share + rank
    if world > 1 and position < source.num_samples:  # one sample: not worth a worker process
        loaders.append(build_loader(source, transform, batch_size=1, shuffle=False, drop_last=False, rank=position,
                                    world_size=source.num_samples))
    return loaders


def gather_shares(feats: list[torch.Tensor], labels: list[torch.Tensor], indices: list[torch.Tensor],
                   num_samples: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's ``(features, labels, sample indices)``, concatenated (rank order; the caller sorts)."""
    if dist.world_size() == 1:
        return torch.cat(feats), torch.cat(labels), torch.cat(indices)
    # A rank with no samples (a split smaller than the world) learns the feature width from rank 0.
    dim = dist.broadcast_object(feats[0].shape[1] if feats else 0) if num_samples < dist.world_size() \
        else feats[0].shape[1]
    no_rows = torch.empty(0, dtype=torch.long)
    local = (torch.cat(feats) if feats else torch.empty((0, dim)), torch.cat(labels) if labels else no_rows,
             torch.cat(indices) if indices else no_rows)
    where = dist.collective_device()
    gathered = [dist.gather_variable(part.to(where)).cpu() for part in local]
    return gathered[0], gathered[1], gathered[2]


def _num_classes(train: DataSource, test: DataSource, train_y: torch.Tensor, test_y: torch.Tensor) -> int:
    for split, y in (("train", train_y), ("test", test_y)):
        if (y < 0).any():
            raise UserError(
                f"the {split} split has unlabelled samples; kNN and linear probes need labelled train and test splits"
            )
    if train.classes and test.classes and list(train.classes) != list(test.classes):
        raise UserError("the train and test splits list different classes; use splits of one labelled dataset")
    num_classes = len(train.classes) if train.classes else int(train_y.max()) + 1
    if int(test_y.max()) >= num_classes:
        raise UserError(f"the test split has label {int(test_y.max())}, outside the train split's {num_classes} classes")
    return num_classes


def extract_labelled(
    encoder: nn.Module,
    train_source: DataSource,
    test_source: DataSource,
    transform: Callable[[Any], torch.Tensor],
    *,
    batch_size: int,
    device: torch.device | str,
    num_workers: int = 0,
    log: Callable[[str], None] | None = None,
    cache: FeatureCache | None = None,
) -> LabelledFeatures:
    """Train and test features plus the class count, checking that both splits are labelled.

    ``log`` (e.g. a console printer) receives one line per split with its size and timing;
    ``cache`` is passed to :func:`extract_features` for both splits.
    """

    def extract(role: str, source: DataSource) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        feats, labels = extract_features(encoder, source, transform, batch_size=batch_size, device=device,
                                         num_workers=num_workers, cache=cache)
        if log is not None:
            log(f"{role} split '{source.split}': {feats.shape[0]} images -> {feats.shape[1]}-d features "
                f"in {time.perf_counter() - start:.1f} s")
        return feats, labels

    train_x, train_y = extract("train", train_source)
    test_x, test_y = extract("test", test_source)
    num_classes = _num_classes(train_source, test_source, train_y, test_y)
    return LabelledFeatures(train_x, train_y, test_x, test_y, num_classes)
