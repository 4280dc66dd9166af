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

import torch
import yaml

from sslcli import distributed as dist
from sslcli.augment import MultiView, eval_transform
from sslcli.config import PretrainConfig, to_dict
from sslcli.data.captions import iter_captions
from sslcli.data.reader import build_loader, resolve_source
from sslcli.engine import checkpoint
from sslcli.engine.device import resolve_device
from sslcli.engine.metrics import MetricsLog, info
from sslcli.engine.optim import build_optimizer
from sslcli.engine.precision import autocast_dtype, grad_scaler
from sslcli.engine.train import LoopSettings, train
from sslcli.errors import UserError
from sslcli.evaluation.features import extract_features
from sslcli.export import encoder_metadata, save_encoder
from sslcli.methods.base import build_method
from sslcli.runs import run_encoder

STATUS_FILE = "run.json"


def run_status(out: Path) -> str | None:
    """``'finished'``, ``'running'`` (started, not finished) or ``None`` (no run here)."""
    status = out / STATUS_FILE
    return json.loads(status.read_text()).get("status") if status.exists() else None


def check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses to clobber a run the user has, unless told to resume or overwrite it."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")
    status = run_status(out)
    if resume:
        if checkpoint.latest(out / "checkpoints") is None:
            raise UserError(f"nothing to resume in '{out}' (no checkpoints); drop --resume to start a new run")
        return
    if status is not None and not overwrite:
        kind = "a finished" if status == "finished" else "an unfinished"
        raise UserError(f"output directory '{out}' already holds {kind} run; pass --resume to continue it, "
                        "--overwrite to replace it, or choose another --out")


def _write_status(out: Path, status: str, **extra: object) -> None:
    if dist.is_main():
        (out / STATUS_FILE).write_text(json.dumps({"status": status, **extra}, indent=2) + "\n")


def pretrain(cfg: PretrainConfig, out: Path, *, device: str = "auto", resume: bool = False,
             overwrite: bool = False) -> Path:
    """Pretrains ``cfg.method`` and returns the run directory (``out``)."""
    out = Path(out)
    dev = resolve_device(device)
    dist.init_from_env(dev)
    check_output_dir(out, resume=resume, overwrite=overwrite)
    if cfg.data is None:
        raise UserError("no training data; pass --data DIR (shards, a brace pattern or an image folder)")
    source = resolve_source(cfg.data, "train")
    world = dist.world_size()
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {world} ranks; pick a multiple")
    local_batch = cfg.batch_size // world
    steps_per_epoch = source.num_samples // world // local_batch
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {cfg.batch_size} exceeds the {source.num_samples} training samples; lower it")

    torch.manual_seed(cfg.seed + dist.rank())
    random.seed(cfg.seed + dist.rank())
    encoder = run_encoder(cfg)
    if cfg.freeze_patch_embed:
        if encoder is None:
            raise UserError(f"--freeze-patch-embed needs a ViT backbone; {cfg.method} trains no backbone")
        encoder.freeze_patch_embed()
    # channels_last: measured ~15% faster for ResNets on CPU too; a no-op for linear layers.
    method = build_method(cfg.method, encoder, cfg.method_args, num_samples=source.num_samples, augment=cfg.augment,
                          epochs=cfg.epochs, captions=lambda: iter_captions(source))
    method = method.to(dev, memory_format=torch.channels_last)
    if cfg.sync_bn and dev.type == "cuda":  # SyncBN's kernels exist for CUDA only
        method = dist.convert_sync_batchnorm(method)
    model = dist.wrap_ddp(method, dev)
    base_lr = cfg.optim.scaled_lr(cfg.batch_size)
    optimizer = build_optimizer(method.param_groups(), cfg.optim, base_lr)
    amp_dtype = autocast_dtype(cfg.precision, dev)
    scaler = grad_scaler(dev, amp_dtype)

    start_epoch = 0
    if resume:
        state = checkpoint.load(checkpoint.latest(out / "checkpoints"))
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"][dist.rank() % len(state["rng"])])
        start_epoch = state["epoch"] + 1
    elif dist.is_main():
        if overwrite and out.exists():
            stale = [out / name for name in ("checkpoints", "results", "metrics.jsonl", STATUS_FILE)]
            for target in stale + sorted(out.glob("*.safetensors")):  # the encoder, a tokenizer
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    dist.barrier()
    _write_status(out, "running", epochs=cfg.epochs)

    info(f"[bold]{cfg.method}[/] on {cfg.arch if encoder is not None else 'its own networks'} | {source.num_samples} images from {cfg.data} | device {dev}"
         f" x{world} | batch {cfg.batch_size} | lr {base_lr:.3g} | precision {amp_dtype or torch.float32}")
    for key, value in method.describe().items():
        info(f"  {key}: {value}")

    views = MultiView(cfg.augment, method.extra_fields())
    meta = dict(method=cfg.method, image_size=cfg.augment.eval_size, mean=cfg.augment.mean, std=cfg.augment.std,
                eval_crop_pct=str(cfg.augment.eval_crop_pct))
    meta.update(method.export_metadata())
    # What `sslcli export` needs to rebuild a backbone that is not plain `cfg.arch` (CMC's 1-channel L encoder),
    # and where the exported one lives in the checkpoint (`backbone`, or a teacher's copy such as DINO's).
    exported = method.export_backbone()
    export_info = {} if exported is None else {
        "spec": dataclasses.asdict(exported.spec), "metadata": method.export_metadata(),
        "module": next(name for name, module in method.named_modules() if module is exported)}

    features_transform = eval_transform(cfg.augment.eval_size, cfg.augment.eval_crop_pct, cfg.augment.mean,
                                        cfg.augment.std)

    def dataset_features(module: torch.nn.Module) -> torch.Tensor:
        return extract_features(module, source, features_transform, batch_size=2 * local_batch, device=dev,
                                num_workers=cfg.num_workers)[0]

    def loader_for_epoch(epoch: int):  # noqa: ANN202 - an iterable of batch dicts
        for param in method.before_epoch(epoch, dataset_features):
            optimizer.state.pop(param, None)  # a re-initialised layer starts without momentum
        return build_loader(source, views, batch_size=local_batch, shuffle=True, seed=cfg.seed, epoch=epoch,
                            num_workers=cfg.num_workers, drop_last=True, rank=dist.rank(), world_size=world)

    def on_epoch_end(epoch: int) -> None:
        # Per-rank RNG states, so each rank resumes its own random stream.
        rng = list(dist.gather_no_grad(torch.get_rng_state()[None]).unbind(0))
        if dist.is_main():
            state = {"model": method.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch, "rng": rng, "config": to_dict(cfg), "export": export_info}
            checkpoint.save_and_prune(state, out / "checkpoints", epoch, cfg.keep_checkpoints)
            if exported is not None:
                save_encoder(exported, out / "encoder.safetensors", encoder_metadata(exported, epochs=epoch + 1, **meta))
            method.save_artifacts(out)
        dist.barrier()

    settings = LoopSettings(epochs=cfg.epochs, optim=cfg.optim, base_lr=base_lr, device=dev, amp_dtype=amp_dtype,
                            log_every=cfg.log_every)
    train(model, method, optimizer, scaler, loader_for_epoch, steps_per_epoch, settings, MetricsLog(out / "metrics.jsonl"),
          on_epoch_end, start_epoch=start_epoch)
    _write_status(out, "finished", epochs=cfg.epochs)
    if exported is not None:
        info(f"done: {out}/encoder.safetensors  (evaluate with `sslcli knn {out} --data {cfg.data}`)")
    else:
        info(f"done: {out}")
    return out
