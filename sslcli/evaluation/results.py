"""One results format for every evaluation command, plus the metric they all report.

A results file is JSON with the keys ``command``, ``sslcli_version``, ``created`` (UTC, ISO
8601), ``encoder`` (what was evaluated, with its preprocessing), ``data``, ``params`` and
``metrics``; accuracies are fractions in ``[0, 1]``.  For a run directory the default place
is ``RUN/results/<command>.json``, so a run carries its own evaluations.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import sslcli
from sslcli.atomic import atomic_path
from sslcli.evaluation.features import EncoderInfo


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}``: the fraction of rows whose label is among the ``k``
    highest-scoring classes.  With fewer than ``k`` classes every row counts as correct."""
    labels = labels.to(scores.device)
    ks = list(ks)
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {f"top{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def default_results_path(encoder: EncoderInfo, command: str) -> Path:
    """``RUN/results/<command>.json`` for a run directory, else ``./<command>-results.json``."""
    if encoder.run_dir is not None:
        return Path(encoder.run_dir) / "results" / f"{command}.json"
    return Path(f"{command}-results.json")


def describe_data(spec: str | Path, splits: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data`` section: the dataset spec plus, per role, split name and size.

    ``splits`` maps a role (``train``, ``test``) to ``(split name, DataSource)``.
    """
    out: dict[str, Any] = {"spec": str(spec)}
    for role, (name, source) in splits.items():
        out[role] = {"split": name, "num_samples": source.num_samples,
                     "num_classes": len(source.classes) if source.classes else None}
    return out


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (Path, torch.device)):
        return str(value)
    return value


def write_results(path: Path, *, command: str, metrics: dict, encoder: EncoderInfo | dict, data: dict,
                  params: dict) -> Path:
    """Writes the results JSON atomically (temp file + rename); returns ``path``."""
    payload = {
        "command": command,
        "sslcli_version": sslcli.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "encoder": _jsonable(encoder),
        "data": _jsonable(data),
        "params": _jsonable(params),
        "metrics": _jsonable(metrics),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{name} ")
        else:
            yield name, value


def print_results(title: str, metrics: Mapping[str, Any]) -> None:
    """A two-column rich table on stdout; nested dicts become ``outer inner`` rows."""
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in _flatten(metrics):
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console(soft_wrap=True).print(table)
