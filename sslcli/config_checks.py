"""Checks of a resolved pretraining config that no type can express: numbers in range, readable YAML.

They run inside :func:`sslcli.config.build_config`, before any data is read or any file is written, so a
typo in a number ends with one line naming the key instead of a stack trace several minutes into a run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sslcli.errors import UserError

if TYPE_CHECKING:
    from sslcli.config import PretrainConfig


def read_yaml(path: Path, what: str) -> Any:
    """``path`` parsed as YAML; a syntax error names the file, line and column in one line."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise UserError(f"{what} '{path}' is not valid YAML{where} ({problem}); fix that line") from None


def check_ranges(cfg: PretrainConfig) -> None:
    """Refuses numbers no run can train with; ``--flag`` names are given where the CLI has one."""
    optim = cfg.optim
    rules: list[tuple[bool, str, str, object]] = [
        (cfg.epochs >= 1, "--epochs (epochs)", "at least 1", cfg.epochs),
        (cfg.batch_size >= 1, "--batch-size (batch_size)", "at least 1", cfg.batch_size),
        (cfg.num_workers >= 0, "--num-workers (num_workers)", "0 or more", cfg.num_workers),
        (cfg.log_every >= 1, "log_every", "at least 1", cfg.log_every),
        (cfg.accum_steps >= 1, "--accum-steps (accum_steps)", "at least 1", cfg.accum_steps),
        (cfg.checkpoint_every >= 0, "--checkpoint-every (checkpoint_every)", "0 (epoch ends only) or more",
         cfg.checkpoint_every),
        (cfg.keep_checkpoints >= 1, "keep_checkpoints", "at least 1", cfg.keep_checkpoints),
        (cfg.max_bad_steps >= 1, "max_bad_steps", "at least 1", cfg.max_bad_steps),
        (0 <= cfg.max_bad_fraction <= 1, "--max-bad-fraction (max_bad_fraction)", "in [0, 1]", cfg.max_bad_fraction),
        (math.isfinite(optim.lr) and optim.lr > 0, "--lr (optim.lr)", "positive, e.g. 0.03 per 256 images", optim.lr),
        (optim.min_lr >= 0, "optim.min_lr", "0 or more", optim.min_lr),
        (optim.bias_lr is None or optim.bias_lr >= 0, "optim.bias_lr", "0 or more", optim.bias_lr),
        (optim.weight_decay >= 0, "optim.weight_decay", "0 or more", optim.weight_decay),
        (optim.warmup_epochs >= 0, "optim.warmup_epochs", "0 or more", optim.warmup_epochs),
        (0 <= optim.momentum < 1, "optim.momentum", "in [0, 1)", optim.momentum),
    ]
    for ok, name, expected, value in rules:
        if not ok:
            raise UserError(f"{name} must be {expected}, got {value}")
