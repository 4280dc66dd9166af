"""`sslcli data ...`: generate the embedded dataset, convert image folders, inspect data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sslcli.data.formats import INDEX_NAME
from sslcli.data.reader import read_index, resolve_source
from sslcli.data.shards import folder_to_shards
from sslcli.data.synth import generate_synthetic
from sslcli.data.synth_pairs import check_hold_out_args
from sslcli.distributed import first_rank_only

app = typer.Typer(no_args_is_help=True)

_LISTED = 4  # names shown before "... and N more"


def _short_list(names: list[str]) -> str:
    """The first few names, with the total when there are more."""
    shown = ", ".join(names[:_LISTED])
    return shown if len(names) <= _LISTED else f"{shown}, ... ({len(names)} in all)"


def _split_summary(index: dict) -> str:
    """'train 10000 in 5 shards, test 2000 in 1 shards' from an index."""
    splits = index["splits"].items()
    return ", ".join(f"{name} {entry['count']} in {len(entry['shards'])} shards" for name, entry in splits)


@app.command("synth")
@first_rank_only("sslcli data synth")
def synth(
    out: Annotated[Path, typer.Argument(help="Directory to write the shards and index.json into.")],
    train: Annotated[int, typer.Option(help="Number of training images.")] = 10000,
    test: Annotated[int, typer.Option(help="Number of test images.")] = 2000,
    size: Annotated[int, typer.Option(help="Image side in pixels (at least 16).")] = 64,
    seed: Annotated[int, typer.Option(help="Seed; the same arguments give byte-identical files.")] = 0,
    shard_size: Annotated[int, typer.Option(help="Images per tar shard.")] = 2000,
    overwrite: Annotated[bool, typer.Option(help="Replace a dataset already in OUT.")] = False,
    max_rotation: Annotated[float, typer.Option(help="Rotate shapes by at most this many degrees either way; "
                                                "below 180 they have an upright orientation (for `rotation`).")] = 180.0,
    hold_out_pairs: Annotated[bool, typer.Option(help="Keep one seeded colour per shape out of train and test and "
                                                 "write an 'unseen' split of only those pairs.")] = False,
    unseen: Annotated[int | None, typer.Option(help="Images in the 'unseen' split (with --hold-out-pairs; "
                                                    "default 1000).", show_default=False)] = None,
    varied_captions: Annotated[bool, typer.Option(help="Captions name the shape always and its size, colour and "
                                                  "background each half the time (for CLIP); images unchanged.")] = False,
    shape_size: Annotated[str | None, typer.Option(help="Draw every shape in this size: small, medium or large "
                                                   "(large: one shape filling much of the image, for `jigsaw` "
                                                   "and `relative-position`); default any.",
                                                   show_default=False)] = None,
) -> None:
    """Generate the embedded labelled shapes dataset as WebDataset shards, plus classes.txt."""
    # None tells "not given" from the default, so --unseen without the flag is an error, not a no-op.
    unseen_count = check_hold_out_args(hold_out_pairs, unseen)
    start = time.perf_counter()
    index = generate_synthetic(
        out, train=train, test=test, size=size, seed=seed, shard_size=shard_size, overwrite=overwrite,
        max_rotation=max_rotation, hold_out_pairs=hold_out_pairs, unseen=unseen_count, varied_captions=varied_captions,
        shape_size=shape_size,
    )
    seconds = time.perf_counter() - start
    console = Console()
    console.print(f"[bold green]wrote[/] {out}: {_split_summary(index)} ({size}x{size} px, seed {seed})")
    console.print(f"{len(index['classes'])} classes: {', '.join(index['classes'])}")
    if "held_out_pairs" in index:
        pairs = ", ".join(f"{colour} {name}" for name, colour in index["held_out_pairs"].items())
        console.print(f"held out of train/test, only in 'unseen': {pairs}")
    console.print(f"took {seconds:.1f} s")


@app.command("shards")
@first_rank_only("sslcli data shards")
def shards(
    src: Annotated[Path, typer.Argument(help="ImageFolder tree (class subfolders) or a folder of images.")],
    out: Annotated[Path, typer.Argument(help="Directory to write the shards and index.json into.")],
    shard_size: Annotated[int, typer.Option(help="Images per tar shard.")] = 1000,
    split: Annotated[str, typer.Option(help="Split name when SRC has no train/test/val subfolders.")] = "train",
    overwrite: Annotated[bool, typer.Option(help="Replace a dataset already in OUT.")] = False,
) -> None:
    """Convert an image folder into WebDataset shards plus index.json."""
    start = time.perf_counter()
    index = folder_to_shards(src, out, shard_size=shard_size, split=split, overwrite=overwrite)
    seconds = time.perf_counter() - start
    console = Console()
    console.print(f"[bold green]wrote[/] {out}: {_split_summary(index)} in {seconds:.1f} s")
    classes = index["classes"]
    console.print(f"{len(classes)} classes: {_short_list(classes)}" if classes else "unlabelled (no class subfolders)")
    if index["skipped"]:
        console.print(f"[yellow]skipped {index['skipped']} file(s) that do not decode as images[/]")


@app.command("subset")
@first_rank_only("sslcli data subset")
def subset(
    data: Annotated[str, typer.Argument(help="Labelled shard directory or image folder.")],
    out: Annotated[Path, typer.Argument(help="Directory to write the subset dataset into.")],
    fraction: Annotated[float, typer.Option(help="Fraction of each class to keep (0.01 = the 1% protocol).")],
    seed: Annotated[int, typer.Option(help="Seed of the per-class draw; same seed, same subset.")] = 0,
    split: Annotated[str, typer.Option(help="Split to subsample; the other splits are linked unchanged.")] = "train",
    shard_size: Annotated[int, typer.Option(help="Images per tar shard.")] = 2000,
    overwrite: Annotated[bool, typer.Option(help="Replace a dataset already in OUT.")] = False,
) -> None:
    """Write a class-balanced, seeded label subset of a split (semi-supervised 1% / 10%)."""
    from sslcli.data.subset import write_label_subset

    index = write_label_subset(data, out, fraction=fraction, seed=seed, split=split, shard_size=shard_size,
                               overwrite=overwrite)
    Console().print(f"[bold green]wrote[/] {out}: {_split_summary(index)} ({fraction:g} of '{split}', seed {seed})")


@app.command("info")
@first_rank_only("sslcli data info")
def info(
    path: Annotated[str, typer.Argument(help="Shard directory, brace pattern, .tar file or image folder.")],
    split: Annotated[str, typer.Option(help="Split to describe.")] = "train",
) -> None:
    """Show how a data argument resolves: kind, sample count, shards or files, classes."""
    source = resolve_source(path, split)
    table = Table(title=f"data: {path}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("kind", source.kind)
    table.add_row("split", source.split)
    table.add_row("samples", str(source.num_samples))
    noun = "shards" if source.kind == "shards" else "files"
    table.add_row(noun, f"{len(source.urls)}: {_short_list([Path(url).name for url in source.urls])}")
    if source.classes:
        table.add_row("classes", f"{len(source.classes)}: {', '.join(source.classes)}")
    else:
        table.add_row("classes", "unlabelled" if source.kind == "folder" else "not recorded")
    directory = Path(path)
    if directory.is_dir() and (directory / INDEX_NAME).is_file():
        index = read_index(directory)
        table.add_row("splits", _split_summary(index))
        table.add_row("image size", str(index.get("image_size")))
        table.add_row("source", str(index.get("source")))
    Console().print(table)
