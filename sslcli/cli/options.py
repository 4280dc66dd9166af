"""Options shared by several subcommands, defined once."""

from __future__ import annotations

from typing import Annotated

import typer

Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Data = Annotated[str, typer.Option("--data", help="Shard directory, brace pattern (train-{000000..000009}.tar) or image folder.")]
OptionalData = Annotated[str | None, typer.Option("--data", help="Shard directory, brace pattern or image folder.")]
Arch = Annotated[str | None, typer.Option("--arch", help="Backbone alias (resnet18, vit_b16, vit_tiny_p4, ...) or any timm name.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output.")]
