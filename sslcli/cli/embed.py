"""`sslcli embed SOURCE --data D`: a split's features to a file, plus PCA (and t-SNE) maps coloured by label."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslcli.cli.evaluate import (
    BatchSize,
    Cache,
    CropPct,
    ImageSize,
    Layer,
    NumWorkers,
    RandomInit,
    RawPixels,
    Source,
    evaluation_setup,
)
from sslcli.cli.options import Arch, Data, Device


def embed_command(
    source: Source = None,
    data: Data = ...,  # type: ignore[assignment]  # required; Typer reads the Ellipsis
    arch: Arch = None,
    random_init: RandomInit = False,
    raw_pixels: RawPixels = False,
    image_size: ImageSize = None,
    crop_pct: CropPct = None,
    layer: Layer = None,
    split: Annotated[str, typer.Option("--split", help="Split whose features are written.")] = "test",
    out: Annotated[Path | None, typer.Option(
        "--out", help="Features file, .safetensors or .npy; default: RUN/results/embed-<split>.safetensors for a "
        "run, else ./embed-<split>.safetensors.  The PNGs go next to it (<stem>-pca.png, <stem>-tsne.png).",
        show_default=False)] = None,
    results: Annotated[Path | None, typer.Option(
        "--results", help="Results JSON; default: RUN/results/embed.json for a run, else ./embed-results.json.",
        show_default=False)] = None,
    batch_size: BatchSize = 256,
    device: Device = "auto",
    num_workers: NumWorkers = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --random-init weights and of t-SNE.")] = 0,
    cache: Cache = True,
) -> None:
    """Writes a split's frozen features (with labels) and their 2-D PCA map; t-SNE too with scikit-learn."""
    from sslcli import distributed as dist
    from sslcli.engine.metrics import info
    from sslcli.evaluation import default_results_path, describe_data, write_results
    from sslcli.evaluation.embed import check_features_path, embed

    if out is not None:
        check_features_path(out)  # before the (possibly long) extraction
    setup = evaluation_setup("embed", source, data, arch=arch, random_init=random_init, raw_pixels=raw_pixels,
                             image_size=image_size, crop_pct=crop_pct, device=device, seed=seed, layer=layer,
                             cache=cache, splits={"embed": split})
    if out is None:
        name = f"embed-{split}.safetensors"
        out = Path(setup.info.run_dir) / "results" / name if setup.info.run_dir else Path(name)
    result = embed(setup.encoder, setup.splits["embed"][1], setup.info.transform(), out, title=setup.info.name,
                   batch_size=batch_size, device=setup.device, num_workers=num_workers, seed=seed,
                   cache=setup.cache, log=info)
    files = {"features": result.features_path, "pca_png": result.pca_png, "tsne_png": result.tsne_png}
    path = dist.on_main(lambda: write_results(  # rank 0 writes; the other ranks wait
        results or default_results_path(setup.info, "embed"), command="embed", metrics=result.metrics,
        encoder=setup.info, data=describe_data(data, setup.splits),
        params={"split": split, "batch_size": batch_size, "seed": seed, "layer": layer, "device": str(setup.device),
                "world_size": dist.world_size(), "files": files}, started=setup.started,
    ))
    ratios = result.metrics["pca_explained_variance_ratio"]
    info(f"features written to {result.features_path}; PCA map ({100 * ratios[0]:.1f}% + {100 * ratios[1]:.1f}% "
         f"of the variance) to {result.pca_png}" + (f"; t-SNE map to {result.tsne_png}" if result.tsne_png else ""))
    info(f"results written to {path}")


def register(app: typer.Typer) -> None:
    """Adds ``embed`` to the root app."""
    app.command("embed")(embed_command)
