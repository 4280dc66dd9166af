"""`sslcli pretrain METHOD`: parses options, resolves the config, calls :func:`sslcli.pretrain.pretrain`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslcli.cli.options import Arch, Device, OptionalData


def pretrain_command(
    method: Annotated[str, typer.Argument(help="Method, or a recipe that names one (seer); `sslcli methods` lists them.")],
    recipe: Annotated[str | None, typer.Option(help="Recipe variant (e.g. 'small') or a YAML file; default: the paper's.")] = None,
    data: OptionalData = None,
    arch: Arch = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Global batch size (all ranks).")] = None,
    lr: Annotated[float | None, typer.Option(help="Base learning rate per 256 images (scaled by batch/256).")] = None,
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/pretrain"),
    device: Device = "auto",
    num_workers: Annotated[int | None, typer.Option("--num-workers", help="Data-loading worker processes per rank.")] = None,
    freeze_patch_embed: Annotated[bool | None, typer.Option("--freeze-patch-embed", help="Keep a ViT's random patch projection frozen (MoCo v3).")] = None,
    global_crops: Annotated[int | None, typer.Option("--global-crops", help="Number of global crops (the first view group).")] = None,
    local_crops: Annotated[int | None, typer.Option("--local-crops", help="Number of local crops (multi-crop); 0 drops them.")] = None,
    global_size: Annotated[int | None, typer.Option("--global-size", help="Global crop side in pixels (also the evaluation size).")] = None,
    local_size: Annotated[int | None, typer.Option("--local-size", help="Local crop side in pixels.")] = None,
    global_scale: Annotated[str | None, typer.Option("--global-scale", help="Global crop area range LO,HI, e.g. 0.14,1.")] = None,
    local_scale: Annotated[str | None, typer.Option("--local-scale", help="Local crop area range LO,HI, e.g. 0.05,0.14.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override any config key: --set optim.weight_decay=1e-5 (repeatable).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in --out.")] = False,
) -> None:
    """Pretrain an encoder with a self-supervised METHOD; writes RUN/encoder.safetensors."""
    from sslcli.config import CropOptions, build_config
    from sslcli.pretrain import pretrain

    options = {"data": data, "arch": arch, "epochs": epochs, "batch_size": batch_size, "optim.lr": lr,
               "num_workers": num_workers, "freeze_patch_embed": freeze_patch_embed}
    crops = CropOptions(global_crops, local_crops, global_size, local_size, global_scale, local_scale)
    cfg = build_config(method, recipe, options, set_, crops)
    pretrain(cfg, out, device=device, resume=resume, overwrite=overwrite)


def methods_command() -> None:
    """List the registered pretraining methods, one line each, and the recipes that run one of them."""
    from rich.console import Console
    from rich.table import Table

    from sslcli.config import load_recipe, recipe_aliases
    from sslcli.methods import METHODS
    from sslcli.methods.base import describe_method

    table = Table("method", "description", box=None)
    rows = {name: describe_method(cls) for name, cls in METHODS.items()}
    for name, method in recipe_aliases().items():
        rows[name] = f"{load_recipe(name, None).get('paper', name)}: a recipe of {method}"
    for name in sorted(rows):
        table.add_row(name, rows[name])
    Console(soft_wrap=True).print(table)


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_command)
    app.command("methods")(methods_command)
