"""``pretrain``: the library entry point behind ``sslcli pretrain METHOD``.

Sets up the run directory, process group, data, method and optimiser, then hands over to
the one training loop in :mod:`sslcli.engine.train`.  Usable from Python::

    from sslcli.config import build_config
    from sslcli.pretrain import pretrain
    pretrain(build_config("simclr", "small", {"data": "demo/data"}), Path("runs/simclr"))
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml

from sslcli import distributed as dist
from sslcli.atomic import atomic_path
from sslcli.augment import eval_transform
from sslcli.config import PretrainConfig, to_dict
from sslcli.data.captions import iter_captions
from sslcli.data.reader import build_loader, epoch_batches, resolve_source
from sslcli.engine import checkpoint
from sslcli.engine.device import memory_format_for, resolve_device
from sslcli.engine.metrics import MetricsLog, info
from sslcli.engine.optim import build_optimizer
from sslcli.engine.precision import autocast_dtype, grad_scaler
from sslcli.engine.preemption import Preempted
from sslcli.engine.resume import LoopState, RunCheckpoints, drop_metrics_after
from sslcli.engine.train import LoopSettings, train
from sslcli.errors import UserError
from sslcli.evaluation.features import extract_features
from sslcli.export import encoder_metadata, save_encoder
from sslcli.methods.base import build_method
from sslcli.run_lock import run_lock
from sslcli.runs import run_encoder
from sslcli.training_views import training_views

STATUS_FILE = "run.json"
# True: continue from the newest checkpoint, which must exist; "auto": continue if there is one.
ResumeMode = bool | Literal["auto"]


def run_status(out: Path) -> str | None:
    """``'finished'``, ``'running'`` (started; or killed without a chance to say so), ``'preempted'``
    (stopped by SIGTERM/SIGUSR1 after a checkpoint), ``'failed'`` (stopped by an error) or ``None`` (no run here)."""
    status = out / STATUS_FILE
    return json.loads(status.read_text()).get("status") if status.exists() else None


def check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses to clobber a run the user has, unless told to resume or overwrite it."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")
    status = run_status(out)
    if resume:
        return
    if status is not None and not overwrite:
        kind = "a finished" if status == "finished" else "an unfinished"
        raise UserError(f"output directory '{out}' already holds {kind} run; pass --resume to continue it, "
                        "--overwrite to replace it, or choose another --out")


def find_resume_state(out: Path, resume: ResumeMode) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint a run continues from: the newest that loads.  ``resume=True`` insists on one;
    ``"auto"`` starts afresh without one (a requeued job that was stopped before its first checkpoint)."""
    if not resume:
        return None
    found = checkpoint.latest_loadable(out / "checkpoints")
    if found is None and checkpoint.latest(out / "checkpoints") is not None:
        raise UserError(f"no checkpoint in '{out}/checkpoints' loads (all corrupt); start a new run with --overwrite "
                        "or another --out")
    if found is None and resume != "auto":
        raise UserError(f"nothing to resume in '{out}' (no checkpoints); drop --resume to start a new run")
    return found


def check_loop_options(cfg: PretrainConfig, local_batch: int) -> None:
    """What depends on the world size (the ranges are checked when the config is built: config_checks.py)."""
    if local_batch % cfg.accum_steps:
        raise UserError(f"--accum-steps {cfg.accum_steps} must divide the per-process batch {local_batch}; "
                        "pick a divisor")


def _write_status(out: Path, status: str, **extra: object) -> None:
    if dist.is_main():
        with atomic_path(out / STATUS_FILE) as tmp:  # a job killed mid-write keeps the previous status
            tmp.write_text(json.dumps({"status": status, **extra}, indent=2) + "\n")


def pretrain(cfg: PretrainConfig, out: Path, *, device: str = "auto", resume: ResumeMode = False,
             overwrite: bool = False) -> Path:
    """Pretrains ``cfg.method`` and returns the run directory (``out``).

    Raises :class:`sslcli.engine.preemption.Preempted` after SIGTERM/SIGUSR1 once a checkpoint is written.
    """
    out = Path(out)
    dev = resolve_device(device)
    dist.init_from_env(dev)
    with run_lock(out):  # a second process on this run directory fails here instead of interleaving writes
        return _pretrain(cfg, out, dev, resume=resume, overwrite=overwrite)


def _pretrain(cfg: PretrainConfig, out: Path, dev: torch.device, *, resume: ResumeMode, overwrite: bool) -> Path:
    found = find_resume_state(out, resume)
    # `--resume auto` before any checkpoint: a job stopped early restarts in place; a finished run is never replaced.
    restart = resume == "auto" and found is None and run_status(out) != "finished"
    check_output_dir(out, resume=found is not None, overwrite=overwrite or restart)
    if cfg.data is None:
        raise UserError("no training data; pass --data DIR (shards, a brace pattern or an image folder)")
    source = resolve_source(cfg.data, "train")
    world = dist.world_size()
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {world} ranks; pick a multiple")
    local_batch = cfg.batch_size // world
    _, steps_per_epoch = epoch_batches(source, batch_size=local_batch, world_size=world, options=cfg.loader)
    check_loop_options(cfg, local_batch)

    torch.manual_seed(cfg.seed + dist.rank())
    random.seed(cfg.seed + dist.rank())
    np.random.seed(cfg.seed + dist.rank())
    encoder = run_encoder(cfg)
    if cfg.freeze_patch_embed:
        if encoder is None:
            raise UserError(f"--freeze-patch-embed needs a ViT backbone; {cfg.method} trains no backbone")
        encoder.freeze_patch_embed()
    method = build_method(cfg.method, encoder, cfg.method_args, num_samples=source.num_samples, augment=cfg.augment,
                          epochs=cfg.epochs, captions=lambda: iter_captions(source))
    method = method.to(dev, memory_format=memory_format_for(method, dev))  # the loop lays out the views alike
    views, make_views = training_views(cfg.augment_on, cfg.augment, method, dev)  # refuses before writing files
    if cfg.sync_bn and dev.type == "cuda":  # SyncBN's kernels exist for CUDA only
        method = dist.convert_sync_batchnorm(method)
    model = dist.wrap_ddp(method, dev)
    if cfg.compile:  # state_dict and the hooks stay on `method`; only forward goes through the compiled graph
        model = torch.compile(model)
    base_lr = cfg.optim.scaled_lr(cfg.batch_size)
    optimizer = build_optimizer(method.param_groups(), cfg.optim, base_lr)
    amp_dtype = autocast_dtype(cfg.precision, dev)
    scaler = grad_scaler(dev, amp_dtype)

    export_info = _export_info(method)
    checkpoints = RunCheckpoints(out / "checkpoints", method, optimizer, scaler, dev, keep=cfg.keep_checkpoints,
                                 steps_per_epoch=steps_per_epoch, extra={"config": to_dict(cfg), "export": export_info})
    loop = LoopState()
    if found is not None:
        loop = checkpoints.restore(*found, cfg.method, cfg.arch)
        if dist.is_main():
            checkpoint.remove_stale_temporaries(out / "checkpoints")
            drop_metrics_after(out / "metrics.jsonl", loop.epoch * steps_per_epoch + loop.batch)
        info(f"resuming from {found[0]}: epoch {loop.epoch}, batch {loop.batch} of {steps_per_epoch}")
    elif dist.is_main():
        if out.exists() and (overwrite or restart):
            stale = [out / name for name in ("checkpoints", "results", "metrics.jsonl", STATUS_FILE)]
            for target in stale + sorted(out.glob("*.safetensors")):  # the encoder, a tokenizer
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    dist.barrier()
    _write_status(out, "running", epochs=cfg.epochs)

    info(f"[bold]{cfg.method}[/] on {cfg.arch if encoder is not None else 'its own networks'} | {source.num_samples} "
         f"images from {cfg.data} | device {dev} x{world} | precision {amp_dtype or torch.float32}"
         f"{' | compiled' if cfg.compile else ''}{' | views augmented on the device' if make_views else ''}")
    info(f"  lr: base {cfg.optim.lr:.3g} per 256 x global batch {cfg.batch_size} ({world} process(es) x {local_batch}"
         f"{f' in {cfg.accum_steps} micro-batches' if cfg.accum_steps > 1 else ''}) -> {base_lr:.3g} "
         f"({cfg.optim.lr_scaling} scaling)")
    for key, value in method.describe().items():
        info(f"  {key}: {value}")

    meta = dict(method=cfg.method, image_size=cfg.augment.eval_size, mean=cfg.augment.mean, std=cfg.augment.std,
                eval_crop_pct=str(cfg.augment.eval_crop_pct))
    meta.update(method.export_metadata())
    exported = method.export_backbone()
    features_transform = eval_transform(cfg.augment.eval_size, cfg.augment.eval_crop_pct, cfg.augment.mean,
                                        cfg.augment.std)

    def dataset_features(module: torch.nn.Module) -> torch.Tensor:
        return extract_features(module, source, features_transform, batch_size=2 * local_batch, device=dev,
                                num_workers=cfg.num_workers)[0]

    def loader_for_epoch(epoch: int, start_batch: int):  # noqa: ANN202 - an iterable of batch dicts
        if start_batch == 0:  # a resumed mid-epoch run has its epoch set-up (DeepCluster's clusters) in the checkpoint
            for param in method.before_epoch(epoch, dataset_features):
                optimizer.state.pop(param, None)  # a re-initialised layer starts without momentum
        return build_loader(source, views, batch_size=local_batch, shuffle=True, seed=cfg.seed, epoch=epoch,
                            num_workers=cfg.num_workers, drop_last=True, rank=dist.rank(), world_size=world,
                            start_batch=start_batch, options=cfg.loader, pin_memory=dev.type == "cuda")

    def on_epoch_end(epoch: int) -> None:
        if dist.is_main():
            if exported is not None:
                save_encoder(exported, out / "encoder.safetensors", encoder_metadata(exported, epochs=epoch + 1, **meta))
            method.save_artifacts(out)
        dist.barrier()

    settings = LoopSettings(epochs=cfg.epochs, optim=cfg.optim, base_lr=base_lr, device=dev, amp_dtype=amp_dtype,
                            log_every=cfg.log_every, accum_steps=cfg.accum_steps, checkpoint_every=cfg.checkpoint_every,
                            max_bad_steps=cfg.max_bad_steps, max_bad_fraction=cfg.max_bad_fraction,
                            make_views=make_views)
    try:
        train(model, method, optimizer, scaler, loader_for_epoch, steps_per_epoch, settings,
              MetricsLog(out / "metrics.jsonl"), checkpoints, on_epoch_end, loop)
    except Preempted as stop:  # a scheduler's `run.json` poll sees why the job ended and where to continue
        _write_status(out, "preempted", epochs=cfg.epochs, signal=stop.signal_name, checkpoint=stop.checkpoint)
        raise
    except Exception as err:
        _write_status(out, "failed", epochs=cfg.epochs, error=f"{type(err).__name__}: {err}")
        raise
    _write_status(out, "finished", epochs=cfg.epochs)
    if exported is not None:
        info(f"done: {out}/encoder.safetensors  (evaluate with `sslcli knn {out} --data {cfg.data}`)")
    else:
        info(f"done: {out}")
    return out


def _export_info(method: torch.nn.Module) -> dict[str, Any]:
    """What `sslcli export` needs to rebuild a backbone that is not plain ``cfg.arch`` (CMC's 1-channel L
    encoder), and where the exported one lives in the checkpoint (``backbone``, or a teacher's copy such as DINO's)."""
    exported = method.export_backbone()
    if exported is None:
        return {}
    return {"spec": dataclasses.asdict(exported.spec), "metadata": method.export_metadata(),
            "module": next(name for name, module in method.named_modules() if module is exported)}
