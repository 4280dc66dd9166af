"""`sslcli zero-shot clip` and `sslcli zero-shot retrieval`: parse options, call :mod:`sslcli.zero_shot`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslcli.cli.options import Device, Images, ImagesSplit, number_list

app = typer.Typer(no_args_is_help=True, help="Zero-shot evaluation of image-text (CLIP) runs: classification "
                  "from class names, image-text retrieval.")

Run = Annotated[str, typer.Argument(help="A CLIP run directory (its latest checkpoint) or one of its "
                                    "checkpoints/epoch-NNNN.pt files.")]
Out = Annotated[Path | None, typer.Option(
    "--out", help="Results JSON; default: RUN/results/<command>.json (other outputs are written beside it).",
    show_default=False)]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")]
Limit = Annotated[int | None, typer.Option(
    "--limit", help="Use only the first N samples of each folder or dataset.", show_default=False)]


@app.command("clip")
def clip_command(
    source: Run,
    images: Images,
    labels: Annotated[Path, typer.Option("--labels", help="Class names, one per line (blank lines and # comments "
                                         "ignored).", show_default=False)],
    templates: Annotated[Path | None, typer.Option(
        "--templates", help="Prompt templates, one per line with {} for the class name; default: the built-in "
        "ensemble.", show_default=False)] = None,
    split: ImagesSplit = "test",
    top_k: Annotated[int, typer.Option("--top-k", help="Predictions kept per image.")] = 5,
    predictions: Annotated[Path | None, typer.Option(
        "--predictions", help="Per-image top-k file, .csv or .json; default: beside the results JSON.",
        show_default=False)] = None,
    shots: Annotated[list[str] | None, typer.Option(
        "--shots", help="Also train N-shot linear probes (e.g. 1,2,4,8,16) on the first dataset's train split "
        "and plot them against zero-shot.", show_default=False)] = None,
    train_split: Annotated[str, typer.Option("--train-split", help="Split the few-shot probes sample from.")] = "train",
    seeds: Annotated[int, typer.Option("--seeds", help="Few-shot draws per shot count (mean and std).")] = 3,
    out: Out = None,
    limit: Limit = None,
    batch_size: BatchSize = 256,
    device: Device = "auto",
) -> None:
    """Classify images among the classes of --labels from their names alone (CLIP's zero-shot transfer)."""
    from sslcli.engine.device import resolve_device
    from sslcli.engine.metrics import info
    from sslcli.errors import UserError
    from sslcli.evaluation import print_results
    from sslcli.zero_shot import zero_shot_classify

    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    shot_counts = tuple(number_list(shots, "--shots", int) or ())
    metrics = zero_shot_classify(source, images, labels, templates_path=templates, split=split, top_k=top_k, out=out,
                                 predictions=predictions, shots=shot_counts, train_split=train_split, seeds=seeds,
                                 batch_size=batch_size, device=resolve_device(device), limit=limit, log=info)
    shown = {k: v for k, v in metrics.items() if k in ("images", "labelled", "top1", "top5")}
    for n, point in metrics.get("few_shot", {}).get("curve", {}).items():
        shown[f"{n}-shot top1"] = f"{point['mean']:.4f} ± {point['std']:.4f}"
    print_results(f"zero-shot clip: {source}", shown)
    info(f"predictions: {metrics['predictions']}; results: {metrics['results']}")


@app.command("retrieval")
def retrieval_command(
    source: Run,
    data: Annotated[str, typer.Argument(help="A captioned shard dataset (txt fields), e.g. the embedded one.")],
    split: ImagesSplit = "test",
    out: Out = None,
    limit: Limit = None,
    batch_size: BatchSize = 256,
    device: Device = "auto",
) -> None:
    """Image->text and text->image recall@1/5/10 on a held-out split, with the chance levels."""
    from sslcli.engine.device import resolve_device
    from sslcli.engine.metrics import info
    from sslcli.errors import UserError
    from sslcli.evaluation import print_results
    from sslcli.zero_shot import zero_shot_retrieval

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    metrics = zero_shot_retrieval(source, data, split=split, out=out, batch_size=batch_size,
                                  device=resolve_device(device), limit=limit, log=info)
    print_results(f"zero-shot retrieval: {source}", {k: v for k, v in metrics.items() if k != "results"})
    info(f"results: {metrics['results']}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="zero-shot")
