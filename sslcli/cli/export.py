"""`sslcli export RUN --out encoder.safetensors`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sslcli.cli.options import Overwrite
from sslcli.distributed import first_rank_only


@first_rank_only("sslcli export")
def export_command(
    run: Annotated[Path, typer.Argument(help="Run directory (uses its latest checkpoint) or a checkpoint .pt file.")],
    out: Annotated[Path, typer.Option("--out", help="Destination .safetensors file.")] = Path("encoder.safetensors"),
    keep_proj_layers: Annotated[int, typer.Option(
        "--keep-proj-layers", help="Also write the first N projector layers to OUT.proj.safetensors "
        "(SimCLR v2 fine-tunes from 1).")] = 0,
    overwrite: Overwrite = False,
) -> None:
    """Export the backbone as timm-compatible safetensors with metadata in the header."""
    from sslcli.export import export_run, read_metadata

    path = export_run(run, out, overwrite=overwrite, keep_proj_layers=keep_proj_layers)
    meta = read_metadata(path)
    Console().print(f"wrote {path}: {meta['arch']} ({meta['timm_name']}), method {meta['method']}, "
                    f"{meta['epochs']} epochs, image size {meta['image_size']}", highlight=False)
    Console().print(f"load with: timm.create_model('{meta['timm_name']}', num_classes=0, **{meta['timm_kwargs']})"
                    " then load_state_dict(safetensors.torch.load_file(path))", highlight=False)
    if keep_proj_layers:
        from sslcli.export import projector_path

        Console().print(f"wrote {projector_path(path)}: the first {keep_proj_layers} projector layer(s)",
                        highlight=False)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
