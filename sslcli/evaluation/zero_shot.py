"""Zero-shot classification with an image-text model (CLIP, Radford et al., 2021, Sec. 3.1).

    w_c = normalize( mean_t normalize( text_encoder(template_t.format(label_c)) ) )   # prompt ensembling, Sec. 3.1.4
    p(c | x) = softmax_c( s * normalize(image_encoder(x)) . w_c )                    # s: the learned logit scale

The class names come from a labels file (one per line); the templates from a file or the built-in ensemble.
Class embeddings are cached on disk per (model, labels, templates), so re-running on other images is free.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sslcli.errors import UserError
from sslcli.weights_file import write_weights

# CLIP's prompt-engineering notebook: the 7 ImageNet templates its authors kept after selection, plus the
# paper's default prompt and the bare name; every template holds one "{}".
BUILTIN_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a {}.", "itap of a {}.", "a bad photo of the {}.", "a origami {}.",
    "a photo of the large {}.", "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)


def _lines(path: Path, what: str, example: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank, non-comment lines of a UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file '{path}' does not exist; pass a text file with {example}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {what} file '{path}' as UTF-8 text ({err}); save it as UTF-8") from None
    entries = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    entries = [(n, line) for n, line in entries if line and not line.startswith("#")]
    if not entries:
        raise UserError(f"{what} file '{path}' is empty (blank lines and # comments are ignored); add {example}")
    return entries


def read_labels(path: Path) -> list[str]:
    """Class names, one per line; blank lines and ``#`` comments are skipped, a repeated name is an error."""
    seen: dict[str, int] = {}
    for number, label in _lines(path, "labels", "one class name per line"):
        if label in seen:
            raise UserError(f"labels file '{path}' repeats '{label}' (lines {seen[label]} and {number}); "
                            "each class name must appear once")
        seen[label] = number
    return list(seen)


def read_templates(path: Path | None) -> list[str]:
    """Prompt templates, one per line, each with exactly one ``{}``; ``None``: the built-in ensemble."""
    if path is None:
        return list(BUILTIN_TEMPLATES)
    templates = []
    for number, template in _lines(path, "templates", "one prompt per line such as 'a photo of a {}.'"):
        if template.count("{}") != 1 or "{" in template.replace("{}", "", 1):
            raise UserError(f"template on line {number} of '{path}' must contain exactly one '{{}}' where the "
                            f"class name goes, e.g. 'a photo of a {{}}.'; got {template!r}")
        templates.append(template)
    return templates


@torch.no_grad()
def class_embeddings(encode_text: Callable[[list[str]], torch.Tensor], labels: Sequence[str],
                     templates: Sequence[str]) -> torch.Tensor:
    """``[C, D]``: per class, the normalised mean of its normalised prompt embeddings (prompt ensembling).

    ``encode_text`` maps a list of prompts to their embeddings ``[P, D]`` (normalised or not)."""
    rows = []
    for label in labels:
        prompts = F.normalize(encode_text([template.format(label) for template in templates]).float(), dim=-1)
        rows.append(F.normalize(prompts.mean(dim=0), dim=-1))
    return torch.stack(rows)


def cache_key(model_fingerprint: str, labels: Sequence[str], templates: Sequence[str]) -> str:
    """What a cached set of class embeddings depends on: the model's weights and the exact prompts."""
    payload = json.dumps({"model": model_fingerprint, "labels": list(labels), "templates": list(templates)})
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cached_class_embeddings(cache_dir: Path, key: str, compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """``(embeddings, came_from_cache)``: read ``cache_dir/classes-KEY.safetensors`` or compute and write it."""
    path = Path(cache_dir) / f"classes-{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["classes"], True
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    embeddings = compute()
    write_weights({"classes": embeddings}, path, {})  # atomic: a killed run leaves no half-written cache entry
    return embeddings, False


def predict(image_embeddings: torch.Tensor, classes: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Class probabilities ``[N, C]`` of normalised image embeddings ``[N, D]`` against class embeddings ``[C, D]``."""
    return (logit_scale * F.normalize(image_embeddings.float(), dim=-1) @ classes.float().T).softmax(dim=-1)
