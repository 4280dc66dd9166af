"""`sslcli report`: parse options, call :mod:`sslcli.evaluation.report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslcli.cli.options import Overwrite
from sslcli.distributed import first_rank_only

FORMATS = ("table", "markdown")


@first_rank_only("sslcli report")
def report_command(
    paths: Annotated[list[Path], typer.Argument(
        help="Results JSON files, run directories (RUN/results/*.json) or finetune outputs (OUT/results.json).",
        show_default=False)],
    metric: Annotated[list[str] | None, typer.Option(
        "--metric", help="Metric per protocol; repeat for several. Nested ones dotted: best.top1, per_k.200.top1.",
        show_default="top1, best.top1")] = None,
    output_format: Annotated[str, typer.Option("--format", help="table (rich, on the terminal) or markdown "
                                               "(on stdout).")] = "table",
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Also write the table as Markdown to FILE.",
                                                  show_default=False)] = None,
    overwrite: Overwrite = False,
) -> None:
    """One table of many evaluations: rows = encoders / runs, columns = protocol and metric ('-' = not run)."""
    from sslcli.atomic import atomic_path
    from sslcli.engine.metrics import info
    from sslcli.errors import UserError
    from sslcli.evaluation.report import DEFAULT_METRICS, build_report, print_report, to_markdown

    if output_format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got '{output_format}'")
    if markdown is not None and markdown.exists() and not overwrite:
        raise UserError(f"'{markdown}' exists; pass --overwrite or choose another --markdown file")
    table = build_report(paths, tuple(metric) if metric else DEFAULT_METRICS)
    text = to_markdown(table)
    if output_format == "markdown":
        typer.echo(text, nl=False)
    else:
        print_report(table)
    if markdown is not None:
        with atomic_path(markdown) as tmp:
            tmp.write_text(text)
    notes = [f"wrote {markdown}"] if markdown is not None else []
    if table.skipped:
        notes.append(f"skipped {len(table.skipped)} JSON file(s) that are not results, e.g. {table.skipped[0]}")
    if table.replaced:
        notes.append(f"{table.replaced} cell(s) were in several files; the newest result is shown")
    for note in notes:
        info(note) if output_format == "table" else typer.echo(note, err=True)


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)
