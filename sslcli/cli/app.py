"""The `sslcli` Typer application: wires the subcommands, applies the global logging options and maps
user errors to exit code 2."""

from __future__ import annotations

from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from sslcli.errors import UserError


class _Group(TyperGroup):
    def invoke(self, ctx: click.Context):  # noqa: ANN201 - click's signature
        # The global options' callback and the subcommands run inside the root group's invoke, so this one
        # handler covers them all.
        try:
            return super().invoke(ctx)
        except UserError as err:
            from sslcli.engine.metrics import error

            error(str(err))
            raise typer.Exit(2) from None


app = typer.Typer(
    name="sslcli",
    cls=_Group,
    help="Self-supervised visual representation learning: pretrain, evaluate and export encoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def global_options(
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="Log warnings and errors only; no progress bars.")] = False,
    log_format: Annotated[str, typer.Option(
        "--log-format", help="text, or json: one JSON object per log line on stderr (for cluster logs); no progress "
        "bars.")] = "text",
    tensorboard: Annotated[bool, typer.Option(
        "--tensorboard", help="Also write training metrics as TensorBoard scalars to RUN/tensorboard/ (needs the "
        "tensorboard package).")] = False,
) -> None:
    """Self-supervised visual representation learning: pretrain, evaluate and export encoders."""
    from sslcli.engine.metrics import configure

    configure(quiet=quiet, log_format=log_format, tensorboard=tensorboard)


def _register() -> None:
    from sslcli.cli import attention, data, embed, evaluate, export, finetune, plot, pretrain, reconstruct, report
    from sslcli.cli import zero_shot

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
    plot.register(app)


_register()


def main() -> None:
    """Console-script entry point."""
    app()
