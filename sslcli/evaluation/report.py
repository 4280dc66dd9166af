"""``sslcli report``: many results files as one table, one row per encoder, one column per (protocol, metric).

    table = build_report([Path("runs/simclr"), Path("ft/results.json")])
    print(to_markdown(table))

A path is a results file, a run directory (its ``results/*.json``) or a ``finetune`` / ``distill`` output
(its ``results.json``).  Rows are what was evaluated: a run directory or weights file for trained
weights, the baseline's name for a random init or raw pixels.  Columns are ``protocol metric`` with
nested metrics dotted (``finetune best.top1``).  A cell two files fill keeps the newer file's value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sslcli.errors import UserError
from sslcli.evaluation.results import read_results

DEFAULT_METRICS = ("top1", "best.top1")
MISSING = "-"
# Column order: the evaluation protocols from cheapest to most expensive, then everything else.
_COMMAND_ORDER = ("knn", "linear-probe", "finetune", "distill", "zero-shot", "zero-shot retrieval", "reconstruct")
_ACCURACY = re.compile(r"(^|_)(top\d+|r@?\d+|recall@?\d*|accuracy)$")

Column = tuple[str, str]  # (protocol label, metric)


@dataclass
class ReportTable:
    """The gathered results: ``cells[(row, column)]`` is a metric value; rows and columns in display order."""

    rows: list[str] = field(default_factory=list)
    columns: list[Column] = field(default_factory=list)
    cells: dict[tuple[str, Column], Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # non-results JSON found inside directories
    replaced: int = 0  # cells filled by more than one file (the newer one kept)

    def value(self, row: str, column: Column) -> Any:
        return self.cells.get((row, column))


def results_files(paths: Iterable[Path]) -> list[tuple[Path, bool]]:
    """``(file, named)`` for each results file: a named file, or the JSON files of a directory
    (``DIR/*.json``, which holds a finetune output's ``results.json``, and a run's ``DIR/results/*.json``;
    ``named`` False: :func:`build_report` skips those that are not results, such as ``RUN/run.json``)."""
    found: list[tuple[Path, bool]] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append((path, True))
        elif path.is_dir():
            inside = sorted(path.glob("*.json")) + sorted((path / "results").glob("*.json"))
            if not inside:
                raise UserError(f"'{path}' holds no results (no *.json, no results/*.json); evaluate it "
                                "first (sslcli knn, linear-probe, finetune) or pass results files")
            found.extend((file, False) for file in inside)
        else:
            raise UserError(f"'{path}' does not exist; pass results files, run directories or finetune outputs")
    return found


def _norm(path: Any) -> str:
    return os.path.normpath(str(path))


def row_label(result: Mapping[str, Any]) -> str:
    """What was evaluated: the run directory or weights file of trained weights, else the baseline's name."""
    encoder = result.get("encoder")
    if not isinstance(encoder, Mapping):
        return str(encoder)
    if encoder.get("kind", "weights") != "weights" and encoder.get("name"):
        return str(encoder["name"])
    for key in ("run_dir", "path", "run"):
        if encoder.get(key):
            return _norm(encoder[key])
    if encoder.get("teacher"):  # distill: the student has no file of its own before this run
        return f"student of {_norm(encoder['teacher'])}"
    return str(encoder.get("name") or "unknown encoder")


def protocol_label(result: Mapping[str, Any]) -> str:
    """The column group: the protocol, prefixed by its command when the name alone would not say which."""
    command, protocol = str(result["command"]), str(result.get("protocol") or result["command"])
    return protocol if protocol.startswith(command) or protocol in command else f"{command} ({protocol})"


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float | int]:
    """Numeric metrics with nested names dotted (``best.top1``, ``per_k.20.top1``); lists and text dropped."""
    flat: dict[str, float | int] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def _column_key(column: Column, metrics: Sequence[str]) -> tuple[int, str, int]:
    label, metric = column
    command = next((c for c in sorted(_COMMAND_ORDER, key=len, reverse=True) if label.startswith(c)), None)
    rank = _COMMAND_ORDER.index(command) if command else len(_COMMAND_ORDER)
    return rank, label, metrics.index(metric)


def build_report(paths: Iterable[Path], metrics: Sequence[str] = DEFAULT_METRICS) -> ReportTable:
    """Reads every results file under ``paths`` (see :func:`results_files`) into a :class:`ReportTable`."""
    table = ReportTable()
    created: dict[tuple[str, Column], str] = {}
    for file, named in results_files(paths):
        try:
            result = read_results(file)
        except UserError:
            if named:
                raise
            table.skipped.append(file)  # e.g. predictions JSON beside the results in RUN/results/
            continue
        table.files.append(file)
        row, label = row_label(result), protocol_label(result)
        when = str((result.get("time") or {}).get("created") or "")
        values = flatten_metrics(result["metrics"])
        for metric in metrics:
            if metric not in values:
                continue
            key = (row, (label, metric))
            if key in table.cells:
                table.replaced += 1
                if when < created[key]:
                    continue
            table.cells[key], created[key] = values[metric], when
            if row not in table.rows:
                table.rows.append(row)
            if key[1] not in table.columns:
                table.columns.append(key[1])
    if not table.files:
        raise UserError("none of the files found is an sslcli results file; pass results files or run directories")
    if not table.columns:
        raise UserError(f"no results file has the metric(s) {', '.join(metrics)}; try --metric top1 or --metric loss")
    table.columns.sort(key=lambda column: _column_key(column, metrics))
    return table


def format_value(metric: str, value: Any) -> str:
    """Accuracies (top-k, recall) in percent with two decimals, other floats to 4 significant digits."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        if _ACCURACY.search(metric.rsplit(".", 1)[-1]) and 0 <= value <= 1:
            return f"{value:.2%}"
        return f"{value:.4g}"
    return str(value)


def _cells(table: ReportTable, row: str) -> list[str]:
    return [format_value(column[1], table.value(row, column)) for column in table.columns]


def to_markdown(table: ReportTable) -> str:
    """A GitHub Markdown table: ``| encoder | knn top1 | ... |``, missing cells ``-``."""
    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    header = ["encoder", *(f"{label} {metric}" for label, metric in table.columns)]
    lines = ["| " + " | ".join(escape(h) for h in header) + " |",
             "|---|" + "---:|" * len(table.columns)]
    lines += ["| " + " | ".join(escape(cell) for cell in [row, *_cells(table, row)]) + " |" for row in table.rows]
    return "\n".join(lines) + "\n"


def print_report(table: ReportTable, console: Console | None = None) -> None:
    """The table on the terminal (rich), one column per (protocol, metric)."""
    view = Table(title=f"results ({len(table.files)} files)", title_justify="left")
    view.add_column("encoder", overflow="fold")
    for label, metric in table.columns:  # fold, not truncate, long protocol names on a narrow terminal
        view.add_column(f"{label}\n{metric}", justify="right", overflow="fold")
    for row in table.rows:
        view.add_row(row, *_cells(table, row))
    (console or Console(soft_wrap=True)).print(view)
