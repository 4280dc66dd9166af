"""`sslcli knn` and `sslcli linear-probe`: parse options, call :mod:`sslcli.evaluation`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sslcli.cli.options import Arch, Data, Device, number_list

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sslcli.data.reader import DataSource
    from sslcli.evaluation import EncoderInfo
    from sslcli.evaluation.feature_cache import FeatureCache


# Options both commands share; the CLI-wide ones (--data, --arch, --device) come from options.py.
Source = Annotated[str | None, typer.Argument(
    help="Run directory (uses RUN/encoder.safetensors) or an exported .safetensors file.", show_default=False)]
RandomInit = Annotated[bool, typer.Option(
    "--random-init", help="Random weights (the baseline): of --arch, or of SOURCE's architecture.")]
RawPixels = Annotated[bool, typer.Option(
    "--raw-pixels", help="No network: the flattened normalised image (the raw-pixel baseline).")]
ImageSize = Annotated[int | None, typer.Option(
    "--image-size", help="Evaluation resolution; default: SOURCE's, else 224.", show_default=False)]
CropPct = Annotated[float | None, typer.Option(
    "--crop-pct", help="Centre-crop fraction; default: SOURCE's, else 0.875 (use 1.0 for small images).",
    show_default=False)]
Layer = Annotated[int | None, typer.Option(
    "--layer", help="Average-pool feature level N instead of the encoder's output: a ResNet's stem and stages "
    "(1..5), a ViT's blocks, an Image GPT's blocks (igpt_*: default the middle one).", show_default=False)]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per forward pass (and probe batch).")]
TrainSplit = Annotated[str, typer.Option("--train-split", help="Split the classifier learns from.")]
TestSplit = Annotated[str, typer.Option("--test-split", help="Split the accuracy is measured on.")]
NumWorkers = Annotated[int, typer.Option("--num-workers", help="Data-loading worker processes.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of --random-init weights and of the probe.")]
ResultsOut = Annotated[Path | None, typer.Option(
    "--out", help="Results JSON; default: RUN/results/<command>.json for a run, else ./<command>-results.json.",
    show_default=False)]
Cache = Annotated[bool, typer.Option(
    "--cache/--no-cache", help="Reuse features stored for this encoder, preprocessing and data (RUN/cache/features "
    "for a run, else $SSLCLI_CACHE/features or ~/.cache/sslcli/features); store them when missing.")]


@dataclass
class EvaluationSetup:
    """What every evaluation command resolves from its shared options."""

    command: str
    encoder: nn.Module
    info: EncoderInfo
    data: str
    splits: dict[str, tuple[str, DataSource]]  # role -> (split name, source)
    device: torch.device
    started: float = field(default_factory=time.perf_counter)  # for the results' elapsed time
    cache: FeatureCache | None = None  # None: --no-cache, or raw pixels (nothing worth storing)


def evaluation_setup(command: str, source: str | None, data: str, *, arch: str | None, random_init: bool,
                     raw_pixels: bool, image_size: int | None, crop_pct: float | None, device: str, seed: int,
                     splits: dict[str, str], layer: int | None, cache: bool = True) -> EvaluationSetup:
    """Resolves device, data (``splits``: role -> split name) and encoder, cheapest checks first so bad input
    fails fast."""
    from sslcli import distributed as dist
    from sslcli.data.reader import resolve_source
    from sslcli.engine.device import resolve_device
    from sslcli.engine.metrics import info as log
    from sslcli.evaluation import resolve_encoder
    from sslcli.evaluation.feature_cache import feature_cache_for

    torch_device = resolve_device(device)
    dist.init_from_env(torch_device)  # under torchrun the ranks share feature extraction
    sources = {role: (name, resolve_source(data, name)) for role, name in splits.items()}
    encoder, info = resolve_encoder(source, arch=arch, random_init=random_init, raw_pixels=raw_pixels,
                                    image_size=image_size, crop_pct=crop_pct, seed=seed, layer=layer)
    return EvaluationSetup(command, encoder, info, data, sources, torch_device,
                  cache=feature_cache_for(info, log=log) if cache else None)


def _report(setup: EvaluationSetup, metrics: dict[str, Any], out: Path | None, params: dict[str, Any]) -> None:
    """Writes the results JSON and prints the metrics table, on rank 0 only (the other ranks wait)."""
    from sslcli import distributed as dist
    from sslcli.engine.metrics import info
    from sslcli.evaluation import default_results_path, describe_data, print_results, write_results

    def report() -> None:
        path = write_results(
            out or default_results_path(setup.info, setup.command), command=setup.command, metrics=metrics,
            encoder=setup.info, data=describe_data(setup.data, setup.splits),
            params={**params, "device": str(setup.device), "world_size": dist.world_size()},
            protocol=params.get("protocol", setup.command), seed=params.get("seed"), started=setup.started,
        )
        print_results(f"{setup.command}: {setup.info.name}", metrics)
        info(f"results written to {path}")

    dist.on_main(report)


def knn_command(
    source: Source = None,
    data: Data = ...,  # type: ignore[assignment]  # required; Typer reads the Ellipsis
    arch: Arch = None,
    random_init: RandomInit = False,
    raw_pixels: RawPixels = False,
    image_size: ImageSize = None,
    crop_pct: CropPct = None,
    layer: Layer = None,
    k: Annotated[list[int] | None, typer.Option("--k", help="Neighbours; repeat for several (--k 20 --k 200).",
                                                show_default="20")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Vote weight exp(cos / T).")] = 0.07,
    batch_size: BatchSize = 256,
    device: Device = "auto",
    out: ResultsOut = None,
    train_split: TrainSplit = "train",
    test_split: TestSplit = "test",
    num_workers: NumWorkers = 0,
    seed: Seed = 0,
    cache: Cache = True,
) -> None:
    """Weighted kNN accuracy: the train split's features vote on each test image's class."""
    from sslcli.engine.metrics import info
    from sslcli.evaluation import knn_evaluate

    ks = k or [20]
    setup = evaluation_setup("knn", source, data, arch=arch, random_init=random_init, raw_pixels=raw_pixels,
                             image_size=image_size, crop_pct=crop_pct, device=device, seed=seed, layer=layer,
                             cache=cache, splits={"train": train_split, "test": test_split})
    metrics = knn_evaluate(setup.encoder, setup.splits["train"][1], setup.splits["test"][1], setup.info.transform(),
                           k=ks, temperature=temperature, batch_size=batch_size, device=setup.device,
                           num_workers=num_workers, log=info, cache=setup.cache)
    _report(setup, metrics, out, {"k": ks, "temperature": temperature, "batch_size": batch_size, "seed": seed,
                                    "layer": layer})


def linear_probe_command(
    source: Source = None,
    data: Data = ...,  # type: ignore[assignment]
    arch: Arch = None,
    random_init: RandomInit = False,
    raw_pixels: RawPixels = False,
    image_size: ImageSize = None,
    crop_pct: CropPct = None,
    layer: Layer = None,
    protocol: Annotated[str | None, typer.Option(
        "--protocol", help="custom (sslcli's), moco (MoCo v1: SGD lr 30, raw features, step decay), mae (MAE: "
        "BN head, LARS, warm-up + cosine) or fast (L-BFGS logistic regression); default custom, fast with "
        "--shots.  Options given explicitly override the protocol's values.", show_default=False)] = None,
    epochs: Annotated[int | None, typer.Option(
        "--epochs", help="Passes over the cached train features (custom and moco 100, mae 90).",
        show_default=False)] = None,
    lr: Annotated[list[str] | None, typer.Option(
        "--lr", help="Peak learning rate; several (0.01,0.1,1 or repeated) sweep them, choosing on a validation "
        "split.  Default: sgd 0.1, adamw 1e-3 (custom), 30 (moco), 0.1 x batch/256 (mae, lars).",
        show_default=False)] = None,
    weight_decay: Annotated[list[str] | None, typer.Option(
        "--weight-decay", help="L2 penalty on the head's weights (fast: lambda, default 1e-3; else 0); several "
        "sweep them.", show_default=False)] = None,
    optimizer: Annotated[str | None, typer.Option(
        "--optimizer", help="sgd (momentum 0.9), adamw or lars; default: the protocol's.", show_default=False)] = None,
    bn_head: Annotated[bool | None, typer.Option(
        "--bn-head/--no-bn-head", help="BatchNorm1d(affine=False) before the linear layer (on for mae).",
        show_default=False)] = None,
    standardize: Annotated[bool | None, typer.Option(
        "--standardize/--no-standardize", help="Scale features to zero mean, unit variance on the train split "
        "(on for custom and fast).", show_default=False)] = None,
    val_fraction: Annotated[float | None, typer.Option(
        "--val-fraction", help="Hold out this class-balanced fraction of the train split for validation "
        "(default 0.1 when sweeping, else none).", show_default=False)] = None,
    shots: Annotated[list[str] | None, typer.Option(
        "--shots", help="Few-shot probes instead: N labelled train images per class (e.g. 1,2,4,8,16), "
        "mean and std of test top-1 over --seeds draws.", show_default=False)] = None,
    seeds: Annotated[int, typer.Option(
        "--seeds", help="Few-shot draws per shot count (seeds --seed, --seed+1, ...).")] = 3,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Images per forward pass (default 256) and, when given, the probe's batch "
        "(default: the protocol's, mae 16384, at most the train rows).", show_default=False)] = None,
    device: Device = "auto",
    out: ResultsOut = None,
    train_split: TrainSplit = "train",
    test_split: TestSplit = "test",
    num_workers: NumWorkers = 0,
    seed: Seed = 0,
    cache: Cache = True,
) -> None:
    """Linear-probe accuracy: a linear classifier trained on frozen train-split features."""
    from sslcli.engine.metrics import info
    from sslcli.evaluation.linear_probe import linear_probe, resolve_probe

    lrs, wds = number_list(lr, "--lr", float), number_list(weight_decay, "--weight-decay", float)
    shot_counts = number_list(shots, "--shots", int) or []
    options: dict[str, Any] = {"protocol": protocol, "epochs": epochs, "lr": lrs, "weight_decay": wds,
                               "optimizer": optimizer, "bn_head": bn_head, "standardize": standardize,
                               "batch_size": batch_size, "val_fraction": val_fraction, "shots": shot_counts,
                               "seeds": seeds}
    resolve_probe(**options)  # bad probe options fail before any data is read or encoder built
    setup = evaluation_setup("linear-probe", source, data, arch=arch, random_init=random_init,
                             raw_pixels=raw_pixels, image_size=image_size, crop_pct=crop_pct, device=device,
                             seed=seed, layer=layer, cache=cache,
                             splits={"train": train_split, "test": test_split})
    report = linear_probe(setup.encoder, setup.splits["train"][1], setup.splits["test"][1], setup.info.transform(),
                          **options, device=setup.device, seed=seed, num_workers=num_workers, log=info,
                          cache=setup.cache)
    _report(setup, report.metrics, out, {**report.params, "extract_batch_size": batch_size or 256, "seed": seed,
                                         "layer": layer})


def register(app: typer.Typer) -> None:
    """Adds ``knn`` and ``linear-probe`` to the root app."""
    app.command("knn")(knn_command)
    app.command("linear-probe")(linear_probe_command)
