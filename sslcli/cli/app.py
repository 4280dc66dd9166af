"""The `sslcli` Typer application: wires the subcommands and maps user errors to exit code 2."""

from __future__ import annotations

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from sslcli.errors import UserError


class _Group(TyperGroup):
    def invoke(self, ctx: click.Context):  # noqa: ANN201 - click's signature
        # Subcommands run inside the root group's invoke, so this one handler covers them all.
        try:
            return super().invoke(ctx)
        except UserError as err:
            Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
            raise typer.Exit(2) from None


app = typer.Typer(
    name="sslcli",
    cls=_Group,
    help="Self-supervised visual representation learning: pretrain, evaluate and export encoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from sslcli.cli import attention, data, embed, evaluate, export, finetune, pretrain, reconstruct, report, zero_shot

    app.add_typer(data.app, name="data", help="Generate the embedded dataset and convert images to shards.")
    pretrain.register(app)
    evaluate.register(app)
    embed.register(app)
    finetune.register(app)
    export.register(app)
    attention.register(app)
    reconstruct.register(app)
    zero_shot.register(app)
    report.register(app)


_register()


def main() -> None:
    """Console-script entry point."""
    app()
