"""``zero-shot``: the library behind ``sslcli zero-shot clip`` and ``sslcli zero-shot retrieval``.

Classification turns into retrieval among class prompts (CLIP, Sec. 3.1); retrieval ranks a split's captions
for each image and its images for each caption.  Usable from Python::

    from sslcli.zero_shot import zero_shot_classify
    metrics = zero_shot_classify("runs/clip", ["data/shapes"], "data/shapes/classes.txt", split="test")

Under torchrun the processes share the image embedding (each embeds its share of a split, as knn does, and
every process gets the whole split in sample order); rank 0 alone embeds the prompts, scores, fits the
few-shot probes and writes, so the results are the single process's.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sslcli import distributed as dist
from sslcli.atomic import atomic_path
from sslcli.augment import eval_transform
from sslcli.data.images import image_file
from sslcli.data.reader import resolve_source
from sslcli.errors import UserError
from sslcli.evaluation.features import gather_shares, rank_loaders
from sslcli.evaluation.linear_probe import state_fingerprint
from sslcli.evaluation.logistic import few_shot_curve
from sslcli.evaluation.plots import confusion_matrix, confusion_png, curve_png
from sslcli.evaluation.results import topk_accuracy, write_results
from sslcli.evaluation.retrieval import retrieval_recall, unique_texts
from sslcli.evaluation.zero_shot import cache_key, cached_class_embeddings, class_embeddings, predict, read_labels, read_templates
from sslcli.methods.clip import CLIP
from sslcli.runs import LoadedRun, load_run


@dataclass
class Embedded:
    """Backbone features ``[N, F]`` of some images with their names, true class names and captions."""

    names: list[str] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)
    classes: list[str | None] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)

    def stacked(self) -> torch.Tensor:
        return torch.cat(self.features) if self.features else torch.zeros(0)


def load_clip(source: str | Path, device: torch.device | str) -> LoadedRun:
    run = load_run(Path(source), "zero-shot needs the text tower, which only the checkpoint holds", expect=CLIP,
                   wrong_method="it has no text tower: zero-shot takes a CLIP run (sslcli pretrain clip ...)")
    run.method.to(device)
    return run


@torch.inference_mode()
def embed_split(model: CLIP, spec: str, split: str, transform: Any, *, batch_size: int, device: torch.device | str,
                limit: int | None = None) -> Embedded:
    """Every sample of ``spec``'s ``split`` (or its first ``limit``) in sample-index order, on every process.

    Each process embeds its share, the stream positions ``rank, rank + W, ...`` (knn's shares, see
    :func:`sslcli.evaluation.features.extract_features`), stopping at ``limit``; the shares are gathered.
    """
    source = resolve_source(spec, split)
    wanted = source.num_samples if limit is None else min(limit, source.num_samples)
    mine = len(range(dist.rank(), wanted, dist.world_size()))  # this process's positions below `wanted`
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    texts: list[str] = []
    for loader in rank_loaders(source, transform, batch_size=batch_size, num_workers=0):
        for batch in loader:
            take = mine - len(texts)
            if take <= 0:
                break
            feats.append(model.backbone(batch["image"][:take].to(device)).float().cpu())
            labels.append(batch["label"][:take])
            indices.append(batch["index"][:take])
            texts += batch["text"][:take]
    all_feats, all_labels, all_indices = gather_shares(feats, labels, indices, wanted)
    all_texts = [text for share in dist.gather_objects(texts) for text in share]  # rank order, as the tensors
    out = Embedded()
    folder = source.kind == "folder"
    for row in torch.sort(all_indices, stable=True).indices.tolist():
        index, label = int(all_indices[row]), int(all_labels[row])
        out.names.append(str(source.urls[index]) if folder else f"{Path(spec).name}/{split}/{index:06d}")
        out.features.append(all_feats[row:row + 1])
        out.classes.append(source.classes[label] if label >= 0 and source.classes else None)
        out.captions.append(all_texts[row])
    return out


@torch.inference_mode()
def embed_inputs(model: CLIP, specs: Sequence[str], split: str, transform: Any, *, batch_size: int,
                 device: torch.device | str, limit: int | None) -> Embedded:
    """Image files one by one; folders and shard datasets split by split (``limit`` samples each)."""
    out = Embedded()
    for spec in specs:
        image = image_file(spec)
        if image is not None:
            out.names.append(str(Path(spec).expanduser()))
            out.features.append(model.backbone(transform(image)[None].to(device)).float().cpu())
            out.classes.append(None)
            out.captions.append("")
            continue
        part = embed_split(model, spec, split, transform, batch_size=batch_size, device=device, limit=limit)
        for name in ("names", "features", "classes", "captions"):
            getattr(out, name).extend(getattr(part, name))
    if not out.names:
        raise UserError("no images to classify; pass image files, a folder of images or a dataset")
    return out


def project(model: CLIP, features: torch.Tensor) -> torch.Tensor:
    """Backbone features -> normalised CLIP image embeddings."""
    with torch.inference_mode():
        weight = model.image_projection.weight.float().cpu()
        return F.normalize(features.float() @ weight.T, dim=-1)


def _transform(run: LoadedRun) -> Any:
    aug = run.config.augment
    return eval_transform(aug.eval_size, aug.eval_crop_pct, aug.mean, aug.std)


def _write_predictions(path: Path, names: list[str], truth: list[str | None], probs: torch.Tensor,
                       labels: list[str], top_k: int) -> None:
    top = probs.topk(min(top_k, len(labels)), dim=1)
    rows = [{"image": name, "label": true or "",
             **{f"top{r + 1}": labels[i] for r, i in enumerate(idx.tolist())},
             **{f"prob{r + 1}": round(p, 6) for r, p in enumerate(ps.tolist())}}
            for name, true, idx, ps in zip(names, truth, top.indices, top.values)]
    if path.suffix == ".json":
        text = json.dumps(rows, indent=1) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def zero_shot_classify(source: str | Path, images: Sequence[str], labels_path: str | Path, *,
                       templates_path: str | Path | None = None, split: str = "test", top_k: int = 5,
                       out: str | Path | None = None, predictions: str | Path | None = None,
                       shots: Sequence[int] = (), train_split: str = "train", seeds: int = 3, batch_size: int = 256,
                       device: torch.device | str = "cpu", limit: int | None = None,
                       log: Any = print) -> dict[str, Any]:
    """Classifies ``images`` among the classes of ``labels_path``; returns (and writes) the metrics.

    Writes the results JSON (default ``RUN/results/zero-shot.json``), the top-k predictions (default beside
    it, ``*-predictions.csv``) and, when the images carry class names, a confusion matrix PNG; with ``shots``,
    the few-shot linear-probe curve on the first dataset's ``train_split`` against zero-shot (PNG and JSON).
    """
    started = time.perf_counter()
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if predictions is not None and Path(predictions).suffix not in (".csv", ".json"):
        raise UserError(f"--predictions '{predictions}' must end in .csv or .json (the format follows the suffix)")
    labels, templates = read_labels(Path(labels_path)), read_templates(None if templates_path is None else Path(templates_path))
    dist.init_from_env(torch.device(device))  # under torchrun the processes share the image embedding
    run = load_clip(source, device)
    model, transform = run.method, _transform(run)
    results = Path(out) if out else run.checkpoint.parent.parent / "results" / "zero-shot.json"
    inputs = embed_inputs(model, images, split, transform, batch_size=batch_size, device=device, limit=limit)
    position = {label: i for i, label in enumerate(labels)}
    known = [i for i, name in enumerate(inputs.classes) if name in position]
    train = _few_shot_train(model, images, position, transform, known, train_split=train_split,
                            batch_size=batch_size, device=device) if shots else None

    def score_and_write() -> dict[str, Any]:
        key = cache_key(json.dumps(state_fingerprint(model)), labels, templates)
        classes, cached = cached_class_embeddings(
            run.checkpoint.parent.parent / "cache", key,
            lambda: class_embeddings(lambda texts: model.encode_text(model.tokenize(texts)).cpu(), labels, templates))
        log(f"{len(labels)} classes x {len(templates)} templates: class embeddings "
            f"{'from the cache' if cached else 'computed and cached'}")
        scale = model.logit_scale.exp().item()
        probs = predict(project(model, inputs.stacked()), classes, scale)
        predictions_path = Path(predictions) if predictions else results.with_name(f"{results.stem}-predictions.csv")
        _write_predictions(predictions_path, inputs.names, inputs.classes, probs, labels, top_k)
        metrics: dict[str, Any] = {"images": len(inputs.names), "predictions": str(predictions_path)}
        if known:
            truth = torch.tensor([position[inputs.classes[i]] for i in known])
            metrics.update(topk_accuracy(probs[known], truth, (1, 5)))
            metrics["labelled"] = len(known)
            matrix = confusion_matrix(probs[known].argmax(1), truth, len(labels))
            metrics["confusion_png"] = str(confusion_png(matrix, labels,
                                                         results.with_name(f"{results.stem}-confusion.png")))
            metrics["confusion"] = matrix.tolist()
        unknown = {name for name in inputs.classes if name is not None and name not in position}
        if unknown:
            log(f"{sum(name in unknown for name in inputs.classes)} images belong to classes missing from the labels "
                f"file ({', '.join(sorted(unknown)[:5])}...): left out of the accuracy")
        if train is not None:
            metrics["few_shot"] = _few_shot(*train, inputs, known, position, metrics["top1"], shots=shots,
                                            train_split=train_split, seeds=seeds, results=results)
        write_results(results, command="zero-shot", metrics=metrics,
                      encoder={"run": str(source), "checkpoint": str(run.checkpoint), "method": run.config.method,
                               "arch": run.config.arch, "epochs": run.epochs_done},
                      data={"inputs": list(images), "split": split, "limit": limit},
                      params={"labels": str(labels_path), "classes": labels, "templates": templates, "top_k": top_k,
                              "logit_scale": scale, "shots": list(shots), "seeds": seeds, "device": str(device),
                              "world_size": dist.world_size()},
                      seed=None, started=started)
        metrics["results"] = str(results)
        return metrics

    return dist.on_main(score_and_write)


def _few_shot_train(model: CLIP, images: Sequence[str], position: dict[str, int], transform: Any, known: list[int],
                    *, train_split: str, batch_size: int,
                    device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features and class positions of the first dataset's ``train_split`` images whose class is in
    the labels file: what the few-shot probes sample from."""
    datasets = [spec for spec in images if image_file(spec) is None]
    if not datasets or not known:
        raise UserError("--shots needs a labelled dataset among the inputs (its train split trains the probes) "
                        "whose classes appear in the labels file")
    train = embed_split(model, datasets[0], train_split, transform, batch_size=batch_size, device=device)
    keep = [i for i, name in enumerate(train.classes) if name in position]
    if not keep:
        raise UserError(f"no image of split '{train_split}' belongs to a class of the labels file; check --train-split")
    return train.stacked()[keep], torch.tensor([position[train.classes[i]] for i in keep])


def _few_shot(train_x: torch.Tensor, train_y: torch.Tensor, inputs: Embedded, known: list[int],
              position: dict[str, int], zero_shot_top1: float, *, shots: Sequence[int], train_split: str, seeds: int,
              results: Path) -> dict:
    """N-shot logistic regression on backbone features of the first dataset's train split, tested on the
    labelled images zero-shot was scored on (CLIP, Fig. 6: zero-shot against few-shot linear probes)."""
    test_x = inputs.stacked()[known]
    test_y = torch.tensor([position[inputs.classes[i]] for i in known])
    curve = few_shot_curve(train_x, train_y, test_x, test_y, len(position), shots=tuple(shots),
                           seeds=tuple(range(seeds)))
    points = [(float(n), curve[str(n)]["mean"]) for n in shots]
    png = curve_png({"linear probe (mean over seeds)": points}, results.with_name(f"{results.stem}-few-shot.png"),
                    x_label="labelled examples per class", y_label="top-1", title="few-shot linear probe vs zero-shot",
                    hlines={"zero-shot": zero_shot_top1})
    return {"curve": curve, "zero_shot_top1": zero_shot_top1, "png": str(png), "train_split": train_split}


def zero_shot_retrieval(source: str | Path, data: str, *, split: str = "test", out: str | Path | None = None,
                        batch_size: int = 256, device: torch.device | str = "cpu", limit: int | None = None,
                        log: Any = print) -> dict[str, Any]:
    """Image->text and text->image recall@1/5/10 over a split's images and captions, with chance levels."""
    started = time.perf_counter()
    dist.init_from_env(torch.device(device))  # under torchrun the processes share the image embedding
    run = load_clip(source, device)
    model = run.method
    split_data = embed_split(model, data, split, _transform(run), batch_size=batch_size, device=device, limit=limit)
    if not any(split_data.captions):
        raise UserError(f"split '{split}' of '{data}' has no captions (txt fields); retrieval needs image-text pairs")

    def score_and_write() -> dict[str, Any]:
        unique, _ = unique_texts(split_data.captions)
        with torch.inference_mode():
            text = torch.cat([model.encode_text(model.tokenize(list(unique[i:i + batch_size]))).cpu()
                              for i in range(0, len(unique), batch_size)])
        metrics = retrieval_recall(project(model, split_data.stacked()), split_data.captions, text, unique)
        metrics.update({"images": len(split_data.names), "unique_captions": len(unique)})
        log(f"{len(split_data.names)} images, {len(unique)} distinct captions")
        results = Path(out) if out else run.checkpoint.parent.parent / "results" / "retrieval.json"
        write_results(results, command="zero-shot retrieval", metrics=metrics,
                      encoder={"run": str(source), "checkpoint": str(run.checkpoint), "method": run.config.method,
                               "arch": run.config.arch, "epochs": run.epochs_done},
                      data={"spec": data, "split": split, "limit": limit},
                      params={"device": str(device), "world_size": dist.world_size()},
                      protocol="retrieval", started=started)
        metrics["results"] = str(results)
        return metrics

    return dist.on_main(score_and_write)
