"""`sslcli pretrain METHOD`: parses options, resolves the config, calls :func:`sslcli.pretrain.pretrain`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslcli.cli.options import Arch, Device, OptionalData


def pretrain_command(
    method: Annotated[str, typer.Argument(help="Method name; `sslcli methods` lists them with a line each.")],
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
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override any config key: --set optim.weight_decay=1e-5 (repeatable).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in --out.")] = False,
) -> None:
    """Pretrain an encoder with a self-supervised METHOD; writes RUN/encoder.safetensors."""
    from sslcli.config import build_config
    from sslcli.pretrain import pretrain

    options = {"data": data, "arch": arch, "epochs": epochs, "batch_size": batch_size, "optim.lr": lr,
               "num_workers": num_workers, "freeze_patch_embed": freeze_patch_embed}
    cfg = build_config(method, recipe, options, set_)
    pretrain(cfg, out, device=device, resume=resume, overwrite=overwrite)


def methods_command() -> None:
    """List the registered pretraining methods, one line each."""
    from rich.console import Console
    from rich.table import Table

    from sslcli.methods import METHODS
    from sslcli.methods.base import describe_method

    table = Table("method", "description", box=None)
    for name in sorted(METHODS):
        table.add_row(name, describe_method(METHODS[name]))
    Console(soft_wrap=True).print(table)


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_command)
    app.command("methods")(methods_command)
