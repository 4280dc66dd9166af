"""`sslcli plot RUN`: the training curves of a run as one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslcli.distributed import first_rank_only


@first_rank_only("sslcli plot")
def plot_command(
    run: Annotated[Path, typer.Argument(help="Run directory written by `sslcli pretrain` (reads RUN/metrics.jsonl "
                                        "and RUN/results/*.json).")],
    out: Annotated[Path | None, typer.Option(
        "--out", help="PNG to write; default: RUN/plots/training.png.", show_default=False)] = None,
) -> None:
    """Plot loss, learning rate, evaluation accuracy and the collapse monitor's curves to a PNG."""
    from sslcli.engine.metrics import info
    from sslcli.errors import UserError
    from sslcli.evaluation.run_plots import plot_run

    if out is not None and out.suffix.lower() != ".png":
        raise UserError(f"--out '{out}' must end in .png (the plot is a PNG image)")
    plot = plot_run(run, out)
    info(f"wrote {plot.path} ({plot.size[0]}x{plot.size[1]} px): {', '.join(plot.panels)}")


def register(app: typer.Typer) -> None:
    app.command("plot")(plot_command)
