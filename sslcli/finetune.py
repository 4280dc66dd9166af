"""``sslcli finetune`` and ``sslcli distill`` as library calls: SimCLR v2's stages 2 and 3.

    finetune(run, labelled_subset)        -> teacher: backbone (+ first projector layers) + linear head
    distill(teacher, unlabelled_images)   -> student: trained on the teacher's tempered soft labels

Each writes ``OUT/classifier.safetensors`` (see :mod:`sslcli.models.classifier`) and
``OUT/results.json`` (the shared results format) with top-1 / top-5 on the test split.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from sslcli.augment import eval_transform
from sslcli.data.reader import resolve_source
from sslcli.engine.device import resolve_device
from sslcli.engine.metrics import info
from sslcli.errors import UserError
from sslcli.evaluation import describe_data, resolve_encoder, write_results
from sslcli.evaluation.finetune import (
    TrainSettings,
    cross_entropy_loss,
    evaluate_classifier,
    teacher_loss,
    train_classifier,
)
from sslcli.export import kept_projector, load_projector, projector_path, run_projector
from sslcli.models.classifier import Classifier, load_classifier, save_classifier

CLASSIFIER = "classifier.safetensors"


def _check_out(out: Path, overwrite: bool) -> None:
    if (out / CLASSIFIER).exists() and not overwrite:
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


def _finish(model: Classifier, out: Path, command: str, settings: TrainSettings, data: str, test_split: str,
            device: torch.device, meta: dict[str, str], encoder_desc: dict[str, Any], params: dict[str, Any]) -> dict:
    """Evaluates on the test split, saves the classifier and the results; returns the metrics."""
    test = resolve_source(data, test_split)
    transform = eval_transform(settings.image_size, float(meta["eval_crop_pct"]), settings.mean, settings.std)
    metrics = evaluate_classifier(model, test, transform, device=device, num_workers=settings.num_workers)
    save_classifier(model.cpu(), out / CLASSIFIER, meta)
    write_results(out / "results.json", command=command, metrics=metrics, encoder=encoder_desc,
                  data={"spec": data, "test": {"split": test_split, "num_samples": test.num_samples}},
                  params={**params, **asdict(settings), "device": str(device)})
    info(f"{command}: top-1 {metrics['top1']:.1%}, top-5 {metrics['top5']:.1%} on '{test_split}'; wrote {out}")
    return metrics


def finetune(source: str, data: str, out: Path, *, settings: TrainSettings, keep_proj_layers: int = 0,
             label_smoothing: float = 0.0, train_split: str = "train", test_split: str = "test",
             device: str = "auto", overwrite: bool = False) -> dict:
    """Fine-tunes ``source``'s backbone (and its first ``keep_proj_layers`` projector layers) with labels."""
    _check_out(out, overwrite)
    torch_device = resolve_device(device)
    train = resolve_source(data, train_split)
    resolve_source(data, test_split)  # fail on a missing test split before training
    encoder, enc_info = resolve_encoder(source, arch=None, random_init=False, image_size=None)
    if enc_info.input_space != "rgb":  # the train augmentation produces RGB tensors
        raise UserError(f"'{source}' takes '{enc_info.input_space}' input, and fine-tuning supports RGB encoders "
                        "only; evaluate it with `sslcli knn` or `sslcli linear-probe`")
    projector = _projector(source, enc_info.path, enc_info.run_dir, keep_proj_layers)
    if not train.classes:
        raise UserError(f"'{data}' has no class names; fine-tuning needs a labelled dataset")
    settings = replace(settings, image_size=enc_info.image_size, mean=enc_info.mean, std=enc_info.std)
    model = Classifier(encoder, len(train.classes), projector)  # type: ignore[arg-type]
    info(f"fine-tuning {enc_info.name} on {train.num_samples} labelled images ({len(train.classes)} classes)"
         f"{f', keeping {keep_proj_layers} projector layer(s)' if keep_proj_layers else ''}")
    train_classifier(model, train, settings, cross_entropy_loss(label_smoothing), device=torch_device, log=info)
    meta = {"eval_crop_pct": str(enc_info.crop_pct), "image_size": str(enc_info.image_size),
            "mean": json.dumps(list(enc_info.mean)), "std": json.dumps(list(enc_info.std)),
            "classes": json.dumps(train.classes), "source": str(source)}
    return _finish(model, out, "finetune", settings, data, test_split, torch_device, meta, asdict(enc_info),
                   {"keep_proj_layers": keep_proj_layers, "label_smoothing": label_smoothing,
                    "train": {"split": train_split, "num_samples": train.num_samples}})


def distill(teacher_path: Path, data: str, out: Path, *, settings: TrainSettings, temperature: float = 1.0,
            student_arch: str | None = None, student_init: str | None = None, train_split: str = "train",
            test_split: str = "test", device: str = "auto", overwrite: bool = False) -> dict:
    """Trains a student on ``data``'s (unlabelled) train images to match ``teacher_path``'s soft labels.

    The student is ``student_init``'s pretrained backbone, or a random ``student_arch`` (default: the
    teacher's architecture, i.e. self-distillation), with a fresh linear head.
    """
    if student_arch and student_init:
        raise UserError("--arch gives a random-init student and --init a pretrained one; pass only one")
    if not temperature > 0:
        raise UserError(f"--temperature must be positive, got {temperature}")
    _check_out(out, overwrite)
    torch_device = resolve_device(device)
    teacher, meta = load_classifier(Path(teacher_path))
    train = resolve_source(data, train_split)
    resolve_source(data, test_split)
    size = int(meta["image_size"])
    if student_init:
        backbone, _ = resolve_encoder(student_init, arch=None, random_init=False, image_size=size)
    else:
        backbone, _ = resolve_encoder(None, arch=student_arch or meta["arch"], random_init=True, image_size=size,
                                      seed=settings.seed)
    student = Classifier(backbone, int(meta["num_classes"]))  # type: ignore[arg-type]
    settings = replace(settings, image_size=size, mean=tuple(json.loads(meta["mean"])),
                       std=tuple(json.loads(meta["std"])))
    info(f"distilling {teacher_path} ({meta['arch']}) into a {student.backbone.spec.arch} student on "
         f"{train.num_samples} images, temperature {temperature}")
    teacher.to(torch_device)
    train_classifier(student, train, settings, teacher_loss(teacher, temperature), device=torch_device, log=info)
    student_meta = {**{k: meta[k] for k in ("eval_crop_pct", "image_size", "mean", "std", "classes")},
                    "teacher": str(teacher_path)}
    return _finish(student, out, "distill", settings, data, test_split, torch_device, student_meta,
                   {"teacher": str(teacher_path), "student_arch": student.backbone.spec.arch,
                    "student_init": student_init},
                   {"temperature": temperature, "train": {"split": train_split, "num_samples": train.num_samples}})
