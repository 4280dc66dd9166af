"""``sslcli finetune`` and ``sslcli distill`` as library calls: SimCLR v2's stages 2 and 3.

    finetune(run, labelled_subset)        -> teacher: backbone (+ first projector layers) + linear head
    distill(teacher, unlabelled_images)   -> student: trained on the teacher's tempered soft labels

Each writes ``OUT/classifier.safetensors`` (see :mod:`sslcli.models.classifier`) and
``OUT/results.json`` (the shared results format) with top-1 / top-5 on the test split.  Fine-tuning
may also train on a class-balanced fraction of the labels (``label_fraction``), select the best
epoch on a held-out validation part of the train split (``eval_every``; ``OUT/best.safetensors``),
and use the BEiT / MAE protocol's layer decay, drop-path and mixup / cutmix.

Both run under torchrun as data-parallel training (see :mod:`sslcli.evaluation.finetune`); rank 0 alone
writes ``OUT``, and the results record ``params.world_size``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from sslcli import distributed as dist
from sslcli.augment import eval_transform
from sslcli.data.reader import DataSource, resolve_source
from sslcli.engine.device import resolve_device
from sslcli.engine.metrics import info
from sslcli.errors import UserError
from sslcli.evaluation import resolve_encoder, write_results
from sslcli.evaluation.finetune import (
    TrainSettings,
    build_mixup,
    cross_entropy_loss,
    evaluate_classifier,
    soft_target_loss,
    teacher_loss,
    train_classifier,
)
from sslcli.evaluation.finetune_parts import BestEpoch, labelled_parts, with_drop_path
from sslcli.export import kept_projector, load_projector, projector_path, run_projector
from sslcli.models.classifier import Classifier, load_classifier, save_classifier

CLASSIFIER = "classifier.safetensors"
BEST = "best.safetensors"


def _check_out(out: Path, overwrite: bool) -> None:
    if ((out / CLASSIFIER).exists() or (out / BEST).exists()) and not overwrite:
        raise UserError(f"'{out}' already holds a classifier; pass --overwrite or choose another --out")


def _projector(source: str, weights_path: str | None, run_dir: str | None, layers: int) -> torch.nn.Sequential | None:
    """SimCLR v2's kept projector layers, from the run's checkpoint or the export's sidecar file."""
    if not layers:
        return None
    if run_dir is not None:
        return run_projector(Path(run_dir), layers)
    sidecar = projector_path(weights_path or source)
    if not sidecar.is_file():
        raise UserError(f"'{source}' was exported without projector layers; re-export with "
                        f"`sslcli export RUN --keep-proj-layers {layers}` or pass the run directory")
    return kept_projector(load_projector(sidecar), layers)


def _split(role: str, name: str, source: DataSource) -> dict[str, Any]:
    return {role: {"split": name, "num_samples": source.num_samples}}


def _finish(model: Classifier, out: Path, command: str, settings: TrainSettings, data: str, test_split: str,
            device: torch.device, meta: dict[str, str], encoder_desc: dict[str, Any], params: dict[str, Any], *,
            started: float, protocol: str | None = None, best: BestEpoch | None = None,
            data_parts: dict[str, Any] | None = None) -> dict:
    """Evaluates on the test split (the last epoch's model, and the best one's when selecting), saves the
    classifier and the results (rank 0); returns the metrics (on every process)."""
    test = resolve_source(data, test_split)
    transform = eval_transform(settings.image_size, float(meta["eval_crop_pct"]), settings.mean, settings.std)
    metrics: dict[str, Any] = evaluate_classifier(model, test, transform, device=device,
                                                  num_workers=settings.num_workers)
    metrics["epochs"] = settings.epochs
    if best is not None:
        metrics["best"] = best.test_metrics(test, transform, device=device, num_workers=settings.num_workers,
                                            last=metrics)
        metrics["validation"] = best.history

    def write() -> None:
        save_classifier(model.cpu(), out / CLASSIFIER, meta)
        if best is None:
            (out / BEST).unlink(missing_ok=True)  # a best checkpoint of an overwritten earlier fine-tune
        write_results(out / "results.json", command=command, metrics=metrics, encoder=encoder_desc,
                      data={"spec": data, **(data_parts or {}), **_split("test", test_split, test)},
                      params={**params, **asdict(settings), "device": str(device), "world_size": dist.world_size()},
                      protocol=protocol, seed=settings.seed, started=started)
        info(f"{command}: top-1 {metrics['top1']:.1%}, top-5 {metrics['top5']:.1%} on '{test_split}'"
             + (f" (best epoch {metrics['best']['epoch']}: {metrics['best']['top1']:.1%})" if best is not None else "")
             + f"; wrote {out}")

    dist.on_main(write)
    return metrics


def finetune(source: str, data: str, out: Path, *, settings: TrainSettings, keep_proj_layers: int = 0,
             label_smoothing: float = 0.0, train_split: str = "train", test_split: str = "test",
             device: str = "auto", overwrite: bool = False, random_init: bool = False, drop_path: float = 0.0,
             label_fraction: float | None = None, eval_every: int = 0, val_fraction: float | None = None) -> dict:
    """Fine-tunes ``source``'s backbone (and its first ``keep_proj_layers`` projector layers) with labels.

    ``random_init`` starts from random weights of ``source``'s architecture (the baseline);
    ``drop_path`` is the backbone's stochastic-depth rate; ``label_fraction`` trains on a seeded,
    class-balanced subset of the train split; ``eval_every`` > 0 evaluates on a held-out ``val_fraction``
    (default 0.1) of the (subset of the) train split every that many epochs and after the last, keeping
    the best epoch's classifier in ``OUT/best.safetensors``.
    """
    started = time.perf_counter()
    settings.check()
    if random_init and keep_proj_layers:
        raise UserError("--random-init has no pretrained projector to keep; drop --keep-proj-layers")
    if not 0 <= drop_path < 1:
        raise UserError(f"--drop-path must be in [0, 1), got {drop_path}; e.g. 0.1")
    if eval_every < 0:
        raise UserError(f"--eval-every must be 0 (no validation) or a number of epochs, got {eval_every}")
    if val_fraction is not None and not eval_every:
        raise UserError("--val-fraction sizes the validation part that --eval-every N evaluates; pass --eval-every")
    _check_out(out, overwrite)
    torch_device = resolve_device(device)
    dist.init_from_env(torch_device)  # under torchrun: data-parallel training, rank 0 writes
    full_train = resolve_source(data, train_split)
    resolve_source(data, test_split)  # fail on a missing test split before training
    encoder, enc_info = resolve_encoder(source, arch=None, random_init=random_init, image_size=None,
                                        seed=settings.seed)
    if enc_info.input_space != "rgb":  # the train augmentation produces RGB tensors
        raise UserError(f"'{source}' takes '{enc_info.input_space}' input, and fine-tuning supports RGB encoders "
                        "only; evaluate it with `sslcli knn` or `sslcli linear-probe`")
    projector = _projector(source, enc_info.path, enc_info.run_dir, keep_proj_layers)
    if not full_train.classes:
        raise UserError(f"'{data}' has no class names; fine-tuning needs a labelled dataset")
    if eval_every and val_fraction is None:
        val_fraction = 0.1
    train, val = labelled_parts(full_train, label_fraction=label_fraction,
                                val_fraction=val_fraction if eval_every else None, seed=settings.seed)
    if drop_path:
        encoder = with_drop_path(encoder, drop_path)  # type: ignore[arg-type]
    settings = replace(settings, image_size=enc_info.image_size, mean=enc_info.mean, std=enc_info.std)
    model = Classifier(encoder, len(full_train.classes), projector)  # type: ignore[arg-type]
    meta = {"eval_crop_pct": str(enc_info.crop_pct), "image_size": str(enc_info.image_size),
            "mean": json.dumps(list(enc_info.mean)), "std": json.dumps(list(enc_info.std)),
            "classes": json.dumps(full_train.classes), "source": str(source)}
    best = None
    if val is not None:
        transform = eval_transform(settings.image_size, enc_info.crop_pct, settings.mean, settings.std)
        best = BestEpoch(val, transform, out / BEST, meta, every=eval_every, last=settings.epochs,
                         device=torch_device, num_workers=settings.num_workers, log=info)
    info(f"fine-tuning {enc_info.name} on {train.num_samples} labelled images ({len(full_train.classes)} classes)"
         f"{f', keeping {keep_proj_layers} projector layer(s)' if keep_proj_layers else ''}"
         f"{f', validating on {val.num_samples}' if val is not None else ''}")
    mixup = build_mixup(settings, len(full_train.classes), label_smoothing)
    loss = soft_target_loss() if mixup is not None else cross_entropy_loss(label_smoothing)
    train_classifier(model, train, settings, loss, device=torch_device, log=info, mixup=mixup, after_epoch=best)
    protocol = "finetune" if label_fraction is None else f"finetune-{label_fraction * 100:g}%"
    parts = {**_split("train", train_split, train), **({} if val is None else _split("val", train_split, val))}
    return _finish(model, out, "finetune", settings, data, test_split, torch_device, meta, asdict(enc_info),
                   {"keep_proj_layers": keep_proj_layers, "label_smoothing": label_smoothing, "drop_path": drop_path,
                    "random_init": random_init, "label_fraction": label_fraction, "eval_every": eval_every,
                    "val_fraction": val_fraction if eval_every else None,
                    "train": {"split": train_split, "num_samples": train.num_samples}},
                   started=started, protocol=protocol, best=best, data_parts=parts)


def distill(teacher_path: Path, data: str, out: Path, *, settings: TrainSettings, temperature: float = 1.0,
            student_arch: str | None = None, student_init: str | None = None, train_split: str = "train",
            test_split: str = "test", device: str = "auto", overwrite: bool = False) -> dict:
    """Trains a student on ``data``'s (unlabelled) train images to match ``teacher_path``'s soft labels.

    The student is ``student_init``'s pretrained backbone, or a random ``student_arch`` (default: the
    teacher's architecture, i.e. self-distillation), with a fresh linear head.
    """
    started = time.perf_counter()
    if student_arch and student_init:
        raise UserError("--arch gives a random-init student and --init a pretrained one; pass only one")
    if not temperature > 0:
        raise UserError(f"--temperature must be positive, got {temperature}")
    _check_out(out, overwrite)
    torch_device = resolve_device(device)
    dist.init_from_env(torch_device)  # under torchrun: data-parallel training, rank 0 writes
    teacher, meta = load_classifier(Path(teacher_path))
    train = resolve_source(data, train_split)
    resolve_source(data, test_split)
    size = int(meta["image_size"])
    if student_init:
        backbone, init_info = resolve_encoder(student_init, arch=None, random_init=False, image_size=size)
        method = init_info.metadata.get("method")
    else:
        backbone, _ = resolve_encoder(None, arch=student_arch or meta["arch"], random_init=True, image_size=size,
                                      seed=settings.seed)
        method = None
    student = Classifier(backbone, int(meta["num_classes"]))  # type: ignore[arg-type]
    settings = replace(settings, image_size=size, mean=tuple(json.loads(meta["mean"])),
                       std=tuple(json.loads(meta["std"])))
    info(f"distilling {teacher_path} ({meta['arch']}) into a {student.backbone.spec.arch} student on "
         f"{train.num_samples} images, temperature {temperature}")
    # Each process runs the teacher on its own share of every batch: its soft labels are per image, so they
    # are the ones one process would compute for the same (augmented) images.
    teacher.to(torch_device)
    train_classifier(student, train, settings, teacher_loss(teacher, temperature), device=torch_device, log=info)
    student_meta = {**{k: meta[k] for k in ("eval_crop_pct", "image_size", "mean", "std", "classes")},
                    "teacher": str(teacher_path)}
    return _finish(student, out, "distill", settings, data, test_split, torch_device, student_meta,
                   {"teacher": str(teacher_path), "student_arch": student.backbone.spec.arch,
                    "student_init": student_init, "method": method},
                   {"temperature": temperature, "train": {"split": train_split, "num_samples": train.num_samples}},
                   started=started, data_parts=_split("train", train_split, train))
