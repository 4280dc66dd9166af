"""Typed configuration: recipes (YAML) -> variant -> CLI options -> ``--set`` overrides.

A recipe file ``recipes/<method>.yaml`` holds the paper's defaults at the top level and named
variants (e.g. ``small`` for the embedded data) under ``variants:``.  Everything is parsed
into dataclasses strictly: an unknown key is a :class:`UserError` that suggests close names.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from sslcli.augment import AugmentConfig, ViewConfig
from sslcli.config_checks import check_ranges, read_yaml
from sslcli.data.loader import StreamOptions
from sslcli.engine.optim import OptimConfig
from sslcli.errors import UserError, suggest


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs, written to ``RUN/config.yaml``."""

    method: str
    arch: str = "resnet50"
    epochs: int = 100
    batch_size: int = 256  # global, over all ranks
    data: str | None = None
    seed: int = 0
    num_workers: int = 2
    augment_on: Literal["workers", "device"] = "workers"  # device: batched on the training device (training_views.py)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    sync_bn: bool = True
    freeze_patch_embed: bool = False  # MoCo v3's random, frozen ViT patch projection
    log_every: int = 10
    keep_checkpoints: int = 2  # the newest ones; the best (lowest epoch-mean loss) is kept as well
    checkpoint_every: int = 0  # optimiser steps between mid-epoch checkpoints; 0: at epoch ends only
    accum_steps: int = 1  # gradient accumulation: each batch runs as this many equal micro-batches
    compile: bool = False  # torch.compile the model
    max_bad_steps: int = 20  # consecutive steps with a NaN/inf loss or gradient before the run stops
    max_bad_fraction: float = 0.1  # share of unreadable samples above which the run stops
    loader: StreamOptions = field(default_factory=StreamOptions)  # split by shard/sample, resampled, buffer
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    method_args: dict[str, Any] = field(default_factory=dict)
    paper: str = ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp``, converting lists to tuples / dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except UserError as err:
                errors.append(str(err))
        raise UserError(errors[0])
    if origin is Literal:
        if value not in args:
            raise UserError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"config key '{key}' needs {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is Any:
        return value
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string; users type it anyway
            return float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and (type(value) is tp):
        return value
    raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from ``data``, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = [prefix + n for n in names]
            raise UserError(f"unknown config key '{prefix}{key}'{suggest(prefix + key, full)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise UserError(f"incomplete config {cls.__name__}: {err}") from None


def to_dict(cfg: Any) -> dict:
    """Plain YAML-safe dict (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def recipe_path(method: str) -> Path:
    return Path(str(resources.files("sslcli").joinpath("recipes", f"{method}.yaml")))


def load_recipe(method: str, recipe: str | None) -> dict:
    """The recipe dict for ``method``: its paper defaults, a named variant, or a user file.

    ``recipe`` is ``None`` (paper defaults), a variant name from the method's recipe file
    (e.g. ``small``), or a path to a YAML file in the same format.
    """
    base_file = recipe_path(method)
    base = yaml.safe_load(base_file.read_text()) if base_file.exists() else {}
    variants = base.pop("variants", {}) or {}
    if recipe is None:
        return base
    if recipe in variants:
        return deep_merge(base, variants[recipe])
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise UserError(f"recipe file '{recipe}' does not exist; pass a variant name or an existing YAML file")
        user = read_yaml(path, "recipe file") or {}
        if not isinstance(user, dict):
            raise UserError(f"recipe file '{recipe}' must hold a mapping of config keys")
        user.pop("variants", None)
        return deep_merge(base, user)
    raise UserError(
        f"unknown recipe '{recipe}' for {method}{suggest(recipe, variants)}; "
        f"variants: {', '.join(variants) or 'none'}, or pass a .yaml file"
    )


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def set_path(data: dict, key: str, value: Any) -> dict:
    """A copy of ``data`` with the dotted ``key`` set to ``value`` (sections created as needed)."""
    out = dict(data)
    node = out
    *parents, leaf = key.split(".")
    for p in parents:
        child = node.get(p)
        if child is not None and not isinstance(child, dict):
            raise UserError(f"bad --set key '{key}': '{p}' is not a section")
        node[p] = dict(child or {})
        node = node[p]
    node[leaf] = value
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """``'optim.lr=0.1'`` -> ``('optim.lr', 0.1)``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"bad --set '{item}'; use --set key=value, e.g. --set optim.lr=0.1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise UserError(f"bad --set value in '{item}'; quote strings and write lists as [a, b]") from None
    return key.strip(), value


def recipe_aliases() -> dict[str, str]:
    """Recipes that run another registered method, e.g. ``seer -> swav``: a file ``recipes/<name>.yaml``
    whose name is no method and whose top level says ``method: <registered method>``."""
    from sslcli.methods import METHODS

    aliases: dict[str, str] = {}
    for path in sorted(recipe_path("any").parent.glob("*.yaml")):
        if path.stem not in METHODS:
            target = (yaml.safe_load(path.read_text()) or {}).get("method")
            if target in METHODS:
                aliases[path.stem] = target
    return aliases


def resolve_method(name: str) -> str:
    """The registered method that ``sslcli pretrain NAME`` runs: ``name`` itself or the one its recipe names."""
    from sslcli.methods import METHODS

    if name in METHODS:
        return name
    aliases = recipe_aliases()
    if name in aliases:
        return aliases[name]
    names = sorted([*METHODS, *aliases])
    raise UserError(f"unknown method '{name}'{suggest(name, names)}; available: {', '.join(names)}")


def build_config(method: str, recipe: str | None = None, options: dict[str, Any] | None = None,
                 sets: list[str] | None = None, crops: CropOptions | None = None) -> PretrainConfig:
    """Resolves a run's config: recipe (+ variant) < explicit CLI ``options`` < ``crops`` < ``--set`` strings.

    ``method`` is a registered method or a recipe that names one (``seer`` runs ``swav``: the written
    config says ``method: swav``).  ``options`` maps dotted config keys (``epochs``, ``optim.lr``) to
    values; ``None`` means "not given".  Unknown keys anywhere raise :class:`UserError` with a suggestion.
    """
    from sslcli.methods.base import check_method_args

    name, method = method, resolve_method(method)  # an unknown name fails before any file is read
    data = load_recipe(name, recipe)
    data["method"] = method
    pairs = [(k, v) for k, v in (options or {}).items() if v is not None]
    for key, value in pairs:
        data = set_path(data, key, value)
    if crops is not None:
        data = apply_crop_options(data, crops)
    for key, value in [parse_override(item) for item in sets or []]:
        data = set_path(data, key, value)
    cfg = from_dict(PretrainConfig, data)
    check_ranges(cfg)
    check_method_args(method, cfg.method_args)
    return cfg


@dataclass
class CropOptions:
    """``sslcli pretrain``'s multi-crop options (``None``: keep the recipe's); scales are ``"LO,HI"``."""

    global_crops: int | None = None
    local_crops: int | None = None
    global_size: int | None = None
    local_size: int | None = None
    global_scale: str | None = None
    local_scale: str | None = None


# Scale of a local group the recipe lacks, when --local-scale is not given: SwAV's 6 x 96 px crops.
DEFAULT_LOCAL_SCALE = (0.05, 0.14)


def _scale(text: str | None, flag: str) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"bad {flag} '{text}'; write LO,HI, e.g. {flag} 0.14,1") from None
    if not 0 < lo <= hi <= 1:
        raise UserError(f"bad {flag} '{text}'; crop scales are areas in (0, 1] with LO <= HI, e.g. {flag} 0.14,1")
    return lo, hi


def _at_least(value: int | None, low: int, flag: str) -> None:
    if value is not None and value < low:
        raise UserError(f"{flag} must be at least {low}, got {value}")


def apply_crop_options(data: dict, crops: CropOptions) -> dict:
    """A copy of the recipe dict ``data`` whose ``augment.views`` follow ``crops``.

    The global groups are the leading view groups of the first group's size (one, or two for an
    asymmetric recipe such as BYOL's); ``--global-size``/``--global-scale`` set each of them.  Local
    options replace the groups after them by one group: the recipe's first local group with the
    given count, size and scale, or, when the recipe has none, the first group's flip and colour
    settings at ``--local-size`` (scale ``--local-scale``, default SwAV's 0.05,0.14).  ``--local-crops 0``
    drops the local crops.
    """
    for value, low, flag in [(crops.global_crops, 1, "--global-crops"), (crops.local_crops, 0, "--local-crops"),
                             (crops.global_size, 1, "--global-size"), (crops.local_size, 1, "--local-size")]:
        _at_least(value, low, flag)
    global_scale, local_scale = _scale(crops.global_scale, "--global-scale"), _scale(crops.local_scale, "--local-scale")
    augment = dict(data.get("augment") or {})
    views = [dict(v) for v in augment.get("views") or [{}]]
    sizes = [v.get("size", ViewConfig.size) for v in views]  # a missing key means the default
    n_global = next((i for i, size in enumerate(sizes) if size != sizes[0]), len(views))
    glob, local = views[:n_global], views[n_global:]
    if crops.global_crops is not None:
        if len(glob) == 1:
            glob[0]["count"] = crops.global_crops
        elif crops.global_crops != sum(v.get("count", ViewConfig.count) for v in glob):
            raise UserError(f"--global-crops cannot resize the recipe's {len(glob)} asymmetric global view groups; "
                            "edit augment.views with --set or a recipe file")
    for v in glob:
        v.update({k: x for k, x in (("size", crops.global_size), ("scale", global_scale)) if x is not None})
    if (crops.local_crops, crops.local_size, local_scale) != (None, None, None):
        if crops.local_crops == 0:
            if crops.local_size is not None or local_scale is not None:
                raise UserError("--local-size and --local-scale contradict --local-crops 0; drop one of them")
            local = []
        elif not local and crops.local_crops is None:
            raise UserError("--local-size and --local-scale need --local-crops N: the recipe has no local crops")
        elif not local and crops.local_size is None:
            raise UserError(f"--local-crops {crops.local_crops} needs --local-size PX: the recipe has no local crops")
        else:
            base = local[0] if local else {k: x for k, x in glob[0].items() if k not in ("count", "size", "scale")}
            given = {"count": crops.local_crops, "size": crops.local_size, "scale": local_scale}
            local = [{**base, **{k: x for k, x in given.items() if x is not None}}]
            local[0].setdefault("scale", DEFAULT_LOCAL_SCALE)
    augment["views"] = glob + local
    return {**data, "augment": augment}
