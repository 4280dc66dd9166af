"""One results format for every evaluation command, plus the metric they all report.

A results file is one JSON object (schema version :data:`SCHEMA`) with the keys

``schema``          the format version, an int (files without it are version 1)
``command``         the command that wrote it (``knn``, ``linear-probe``, ``finetune``, ...)
``protocol``        how it evaluated: ``knn``, a linear-probe protocol name, ``finetune``, ``finetune-10%``, ...
``encoder``         what was evaluated, with its preprocessing
``method``          the pretraining method, from the encoder's metadata; null when unknown or random init
``data``            the dataset spec and, per role, split name and size
``params``          the command's settings
``metrics``         the numbers; accuracies are fractions in ``[0, 1]``
``seed``            the seed that drove it (null when nothing is random)
``time``            ``{"created": UTC ISO 8601, "elapsed_s": seconds or null}``
``sslcli_version``  the version that wrote it

For a run directory the default place is ``RUN/results/<command>.json``, so a run carries its own
evaluations; :func:`read_results` reads any version back in the current shape.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import sslcli
from sslcli.atomic import atomic_path
from sslcli.errors import UserError
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


SCHEMA = 2
RESULT_KEYS = ("schema", "command", "protocol", "encoder", "method", "data", "params", "metrics", "seed", "time",
               "sslcli_version")


def _method_of(encoder: EncoderInfo | Mapping[str, Any]) -> str | None:
    """The pretraining method of trained weights, from their metadata; None for baselines and the unknown."""
    if isinstance(encoder, EncoderInfo):
        return encoder.metadata.get("method") if encoder.kind == "weights" else None
    if encoder.get("kind", "weights") != "weights":
        return None
    method = encoder.get("method") or (encoder.get("metadata") or {}).get("method")
    return str(method) if method else None


def write_results(path: Path, *, command: str, metrics: dict, encoder: EncoderInfo | dict, data: dict,
                  params: dict, protocol: str | None = None, method: str | None = None, seed: int | None = None,
                  started: float | None = None) -> Path:
    """Writes the results JSON atomically (temp file + rename); returns ``path``.

    ``protocol`` defaults to ``command``, ``method`` to the encoder's (see :func:`_method_of`), ``seed`` to
    ``params["seed"]``; ``started`` is the ``time.perf_counter()`` reading when the work began, for ``elapsed_s``.
    """
    payload = {
        "schema": SCHEMA,
        "command": command,
        "protocol": protocol or command,
        "encoder": _jsonable(encoder),
        "method": method if method is not None else _method_of(encoder),
        "data": _jsonable(data),
        "params": _jsonable(params),
        "metrics": _jsonable(metrics),
        "seed": seed if seed is not None else params.get("seed"),
        "time": {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "elapsed_s": None if started is None else round(time.perf_counter() - started, 3)},
        "sslcli_version": sslcli.__version__,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def read_results(path: Path) -> dict[str, Any]:
    """The results file at ``path`` in the current shape (version 1 files are upgraded); a one-line
    :class:`UserError` for a missing, unreadable, foreign or newer file."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"results file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"'{path}' is not a readable JSON file ({err}); pass sslcli results files") from None
    if not (isinstance(payload, dict) and isinstance(payload.get("command"), str)
            and isinstance(payload.get("metrics"), dict) and "sslcli_version" in payload):
        raise UserError(f"'{path}' is not an sslcli results file (no command, metrics and sslcli_version); "
                        "pass files written by sslcli's evaluation commands")
    schema = payload.get("schema", 1)
    if not isinstance(schema, int) or schema > SCHEMA:
        raise UserError(f"'{path}' has results schema {schema!r}, newer than this sslcli's {SCHEMA}; upgrade sslcli")
    if schema == 1:  # version 1 had a top-level "created" and no protocol, method, seed or elapsed time
        encoder = payload.get("encoder") or {}
        payload = {"schema": SCHEMA, "command": payload["command"], "protocol": payload["command"],
                   "encoder": encoder, "method": _method_of(encoder) if isinstance(encoder, dict) else None,
                   "data": payload.get("data"), "params": payload.get("params") or {}, "metrics": payload["metrics"],
                   "seed": (payload.get("params") or {}).get("seed"),
                   "time": {"created": payload.get("created"), "elapsed_s": None},
                   "sslcli_version": payload["sslcli_version"]}
    missing = [key for key in RESULT_KEYS if key not in payload]
    if missing:
        raise UserError(f"'{path}' lacks the results keys {', '.join(missing)}; was it edited by hand?")
    return payload


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
