"""`sslcli pretrain METHOD`: parses options, resolves the config, calls :func:`sslcli.pretrain.pretrain`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslcli.cli.options import Arch, Device, OptionalData


def pretrain_command(
    method: Annotated[str, typer.Argument(help="Method, or a recipe that names one (seer); `sslcli methods` lists them.")],
    # `--resume auto` reads as the flag followed by this argument: Typer has no option with an optional value.
    resume_mode: Annotated[str | None, typer.Argument(hidden=True, show_default=False)] = None,
    recipe: Annotated[str | None, typer.Option(help="Recipe variant (e.g. 'small') or a YAML file; default: the paper's.")] = None,
    data: OptionalData = None,
    arch: Arch = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Global batch size (all ranks).")] = None,
    lr: Annotated[float | None, typer.Option(help="Base learning rate per 256 images (scaled by batch/256).")] = None,
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/pretrain"),
    device: Device = "auto",
    num_workers: Annotated[int | None, typer.Option("--num-workers", help="Data-loading worker processes per rank.")] = None,
    augment_on: Annotated[str | None, typer.Option("--augment-on", help="Where views are augmented: 'workers' (per "
                                                   "image, in the loader's processes) or 'device' (per batch, on the "
                                                   "training device).")] = None,
    freeze_patch_embed: Annotated[bool | None, typer.Option("--freeze-patch-embed", help="Keep a ViT's random patch projection frozen (MoCo v3).")] = None,
    global_crops: Annotated[int | None, typer.Option("--global-crops", help="Number of global crops (the first view group).")] = None,
    local_crops: Annotated[int | None, typer.Option("--local-crops", help="Number of local crops (multi-crop); 0 drops them.")] = None,
    global_size: Annotated[int | None, typer.Option("--global-size", help="Global crop side in pixels (also the evaluation size).")] = None,
    local_size: Annotated[int | None, typer.Option("--local-size", help="Local crop side in pixels.")] = None,
    global_scale: Annotated[str | None, typer.Option("--global-scale", help="Global crop area range LO,HI, e.g. 0.14,1.")] = None,
    local_scale: Annotated[str | None, typer.Option("--local-scale", help="Local crop area range LO,HI, e.g. 0.05,0.14.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override any config key: --set optim.weight_decay=1e-5 (repeatable).")] = None,
    precision: Annotated[str | None, typer.Option(help="auto (bf16 on a GPU, fp32 on the CPU), bf16, fp16 (with loss "
                                                       "scaling) or fp32.")] = None,
    compile_: Annotated[bool | None, typer.Option("--compile", help="torch.compile the model (first steps compile).")] = None,
    accum_steps: Annotated[int | None, typer.Option("--accum-steps", help="Run each batch as N micro-batches, summing "
                                                    "gradients (exact for per-sample losses only; see docs).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option("--checkpoint-every", help="Also checkpoint every N steps "
                                                         "within epochs (0: epoch ends only).")] = None,
    max_bad_fraction: Annotated[float | None, typer.Option("--max-bad-fraction", help="Stop when more than this share "
                                                           "of samples is unreadable.")] = None,
    split_by: Annotated[str | None, typer.Option("--split-by", help="Split shards between ranks and workers by "
                                                 "'shard', by 'sample', or 'auto' (see docs/data.md).")] = None,
    resampled: Annotated[bool | None, typer.Option("--resampled", help="Draw shards with replacement: endless data, "
                                                   "--epoch-samples per epoch.")] = None,
    epoch_samples: Annotated[int | None, typer.Option("--epoch-samples", help="Samples per epoch with --resampled "
                                                      "(default: the dataset's size).")] = None,
    shuffle_buffer: Annotated[int | None, typer.Option("--shuffle-buffer", help="Samples held by the streaming "
                                                       "shuffle.")] = None,
    prefetch: Annotated[int | None, typer.Option("--prefetch", help="Batches each loader worker prepares ahead.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint; `--resume auto` "
                                              "also starts a new run when there is none (for requeued jobs).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in --out.")] = False,
) -> None:
    """Pretrain an encoder with a self-supervised METHOD; writes RUN/encoder.safetensors.

    SIGTERM or SIGUSR1 writes a checkpoint at the next step and exits with code 75; `--resume auto` continues.
    """
    from sslcli.config import CropOptions, build_config
    from sslcli.engine.metrics import warn
    from sslcli.engine.preemption import PREEMPTED_EXIT_CODE, Preempted
    from sslcli.errors import UserError
    from sslcli.pretrain import pretrain

    if resume_mode is not None and not (resume and resume_mode == "auto"):
        raise UserError(f"unexpected argument '{resume_mode}'; the only word after the method is 'auto', as in "
                        "--resume auto")
    options = {"data": data, "arch": arch, "epochs": epochs, "batch_size": batch_size, "optim.lr": lr,
               "num_workers": num_workers, "augment_on": augment_on, "freeze_patch_embed": freeze_patch_embed,
               "precision": precision, "compile": compile_, "accum_steps": accum_steps,
               "checkpoint_every": checkpoint_every, "max_bad_fraction": max_bad_fraction, "loader.split_by": split_by,
               "loader.resampled": resampled, "loader.epoch_samples": epoch_samples,
               "loader.shuffle_buffer": shuffle_buffer, "loader.prefetch": prefetch}
    crops = CropOptions(global_crops, local_crops, global_size, local_size, global_scale, local_scale)
    cfg = build_config(method, recipe, options, set_, crops)
    try:
        pretrain(cfg, out, device=device, resume="auto" if resume_mode else resume, overwrite=overwrite)
    except Preempted as stop:
        warn(str(stop))
        raise typer.Exit(PREEMPTED_EXIT_CODE) from None


def methods_command() -> None:
    """List the registered pretraining methods, one line each, and the recipes that run one of them."""
    from rich.console import Console
    from rich.table import Table

    from sslcli.config import load_recipe, recipe_aliases
    from sslcli.methods import METHODS
    from sslcli.methods.base import describe_method

    table = Table("method", "description", box=None)
    rows = {name: describe_method(cls) for name, cls in METHODS.items()}
    for name, method in recipe_aliases().items():
        rows[name] = f"{load_recipe(name, None).get('paper', name)}: a recipe of {method}"
    for name in sorted(rows):
        table.add_row(name, rows[name])
    Console(soft_wrap=True).print(table)


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_command)
    app.command("methods")(methods_command)
