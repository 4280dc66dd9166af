"""`sslcli finetune` and `sslcli distill`: parse options, call :mod:`sslcli.finetune`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslcli.cli.options import Data, Device, Overwrite

# Training options both commands share, defined once.
Epochs = Annotated[int, typer.Option("--epochs", help="Passes over the training split.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per step, over all processes under torchrun "
                                        "(each takes an equal share).")]
Optimizer = Annotated[str, typer.Option("--optimizer", help="lars (SimCLR v2), sgd (momentum 0.9) or adamw.")]
Lr = Annotated[float, typer.Option("--lr", help="Peak learning rate for a batch of 256 (scaled linearly; cosine decay).")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", help="Decoupled from biases and norms.")]
Warmup = Annotated[float, typer.Option("--warmup-epochs", help="Linear warm-up length.")]
MinScale = Annotated[float, typer.Option("--min-scale", help="Smallest random-resized-crop area (0.08 ImageNet; "
                                         "0.5 for the 64-px embedded data).")]
Workers = Annotated[int, typer.Option("--num-workers", help="Data-loading worker processes.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the head, the data order and the augmentation.")]
Out = Annotated[Path, typer.Option("--out", help="Directory for classifier.safetensors and results.json.")]
TrainSplit = Annotated[str, typer.Option("--train-split", help="Split to train on.")]
TestSplit = Annotated[str, typer.Option("--test-split", help="Split the accuracy is measured on.")]
# finetune only (the BEiT / MAE protocol and the semi-supervised one).  --random-init differs from the
# evaluation commands' option: finetune has no --arch, so SOURCE always names the architecture.
RandomInit = Annotated[bool, typer.Option(
    "--random-init", help="Random weights of SOURCE's architecture, with its preprocessing (the baseline).")]
LayerDecay = Annotated[float | None, typer.Option(
    "--layer-decay", help="Layer-wise lr decay for ViTs: block i of L trains at lr x F^(L-i), the embeddings at "
    "F^(L+1), the head at lr (BEiT / MAE: 0.65-0.75).", show_default=False)]
DropPath = Annotated[float, typer.Option("--drop-path", help="Stochastic-depth rate of the backbone (MAE: 0.1).")]
MixupAlpha = Annotated[float, typer.Option("--mixup", help="Mixup Beta alpha; 0 = off (MAE: 0.8).")]
CutmixAlpha = Annotated[float, typer.Option("--cutmix", help="CutMix Beta alpha; 0 = off (MAE: 1.0). With --mixup, "
                                            "each batch gets one of the two.")]
LabelFraction = Annotated[float | None, typer.Option(
    "--label-fraction", help="Train on a seeded, class-balanced fraction of the train labels (0.01, 0.1); "
    "the images `sslcli data subset --fraction F --seed SEED` selects.", show_default=False)]
EvalEvery = Annotated[int, typer.Option(
    "--eval-every", help="Validate every N epochs (and after the last) on a held-out part of the train split; "
    "keep the best epoch in OUT/best.safetensors. 0 = off.")]
ValFraction = Annotated[float | None, typer.Option(
    "--val-fraction", help="Class-balanced fraction of the (labelled) train images held out for --eval-every.",
    show_default="0.1")]


def finetune_command(
    source: Annotated[str, typer.Argument(help="Run directory or exported .safetensors encoder.")],
    data: Data = ...,  # type: ignore[assignment]  # required
    out: Out = Path("finetune"),
    keep_proj_layers: Annotated[int, typer.Option(
        "--keep-proj-layers", help="Fine-tune from this many projector layers (SimCLR v2: 1).")] = 0,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Cross-entropy smoothing "
                                                   "(of mixup's targets with --mixup / --cutmix).")] = 0.0,
    random_init: RandomInit = False,
    label_fraction: LabelFraction = None,
    eval_every: EvalEvery = 0,
    val_fraction: ValFraction = None,
    layer_decay: LayerDecay = None,
    drop_path: DropPath = 0.0,
    mixup: MixupAlpha = 0.0,
    cutmix: CutmixAlpha = 0.0,
    epochs: Epochs = 30,
    batch_size: BatchSize = 64,
    optimizer: Optimizer = "lars",
    lr: Lr = 0.16,
    weight_decay: WeightDecay = 0.0,
    warmup_epochs: Warmup = 0.0,
    min_scale: MinScale = 0.08,
    device: Device = "auto",
    num_workers: Workers = 0,
    seed: Seed = 0,
    train_split: TrainSplit = "train",
    test_split: TestSplit = "test",
    overwrite: Overwrite = False,
) -> None:
    """Fine-tune the whole network with labels (all, or --label-fraction of them); reports test top-1/top-5."""
    from sslcli.evaluation.finetune import TrainSettings
    from sslcli.finetune import finetune

    settings = TrainSettings(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                             weight_decay=weight_decay, warmup_epochs=warmup_epochs, min_scale=min_scale,
                             num_workers=num_workers, seed=seed, layer_decay=layer_decay, mixup=mixup, cutmix=cutmix)
    finetune(source, data, out, settings=settings, keep_proj_layers=keep_proj_layers,
             label_smoothing=label_smoothing, train_split=train_split, test_split=test_split, device=device,
             overwrite=overwrite, random_init=random_init, drop_path=drop_path, label_fraction=label_fraction,
             eval_every=eval_every, val_fraction=val_fraction)


def distill_command(
    teacher: Annotated[Path, typer.Argument(help="A `sslcli finetune` output directory (the teacher).")],
    data: Data = ...,  # type: ignore[assignment]
    out: Out = Path("distill"),
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature of both networks.")] = 1.0,
    arch: Annotated[str | None, typer.Option("--arch", help="Random-init student architecture; default: the "
                                             "teacher's (self-distillation).", show_default=False)] = None,
    init: Annotated[str | None, typer.Option("--init", help="Start the student from this pretrained run or "
                                             "encoder instead.", show_default=False)] = None,
    epochs: Epochs = 30,
    batch_size: BatchSize = 64,
    optimizer: Optimizer = "lars",
    lr: Lr = 0.16,
    weight_decay: WeightDecay = 0.0,
    warmup_epochs: Warmup = 0.0,
    min_scale: MinScale = 0.08,
    device: Device = "auto",
    num_workers: Workers = 0,
    seed: Seed = 0,
    train_split: TrainSplit = "train",
    test_split: TestSplit = "test",
    overwrite: Overwrite = False,
) -> None:
    """Distil a fine-tuned teacher into a student on unlabelled images (SimCLR v2 stage 3)."""
    from sslcli.evaluation.finetune import TrainSettings
    from sslcli.finetune import distill

    settings = TrainSettings(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                             weight_decay=weight_decay, warmup_epochs=warmup_epochs, min_scale=min_scale,
                             num_workers=num_workers, seed=seed)
    distill(teacher, data, out, settings=settings, temperature=temperature, student_arch=arch, student_init=init,
            train_split=train_split, test_split=test_split, device=device, overwrite=overwrite)


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_command)
    app.command("distill")(distill_command)
