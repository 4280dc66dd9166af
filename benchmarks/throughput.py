"""Training throughput of one method x arch x batch x precision: the data pipeline alone (per worker count),
the model step alone, end to end; peak memory, model FLOPs per step and, on a GPU, MFU.

    python -m benchmarks.throughput --method simclr --recipe small --data DIR --workers 0,1,2 --steps 20 \\
        --out benchmarks/results/throughput-simclr.json

- *data pipeline*: the loader ``sslcli pretrain`` builds (shards -> decoded, augmented views in the workers),
  consumed by a loop that does nothing else (benchmarks/pipeline.py);
- *model step*: random tensors of the method's view shapes, already on the device, through the training
  loop's own step (``forward_backward`` and ``guarded_update`` of sslcli/engine/step.py: autocast, the
  non-finite guard, clipping, the optimiser and the method's hooks, EMA updates included);
- *end to end*: the loader feeding that step; the time blocked on the next batch is reported as the
  share spent waiting for data, the rest (transfer and step) as the model's share.

``--augment-on device`` runs the data and end-to-end phases as ``sslcli pretrain --augment-on device`` does
(sslcli/training_views.py): the workers only decode, and each step first augments its batch on the device.
The data phase is then the workers' decoding alone; end to end, ``views_fraction`` is the part of the
model's share spent making the views (host time: on a GPU, launching the augmentation's kernels).

An image counts once whatever its number of views. Model FLOPs: benchmarks/flops.py. Peak memory:
benchmarks/machine.py. The JSON holds the machine, the exact config and every figure;
``python -m benchmarks.throughput_report FILES`` tabulates several.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.flops import count_flops, matmul_peak
from benchmarks.machine import PeakMemory, describe
from benchmarks.pipeline import endless_batches, pretrain_loader, time_pipeline
from benchmarks.throughput_report import summary
from sslcli.augment import MultiView, eval_transform
from sslcli.data.loader import DecodeOnly, Transform
from sslcli.config import CropOptions, PretrainConfig, build_config, to_dict
from sslcli.data.reader import DataSource, epoch_batches, resolve_source
from sslcli.engine.device import memory_format_for, resolve_device
from sslcli.engine.guards import StepGuard
from sslcli.engine.optim import apply_schedules, build_optimizer
from sslcli.engine.precision import autocast_dtype, grad_scaler
from sslcli.engine.step import forward_backward, guarded_update
from sslcli.evaluation.features import extract_features
from sslcli.methods.base import Method, build_method
from sslcli.runs import run_encoder
from sslcli.training_views import ViewMaker, training_views

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


@dataclass
class Bench:
    """What the timed phases share: the method as ``sslcli pretrain`` builds it, and its optimiser."""

    cfg: PretrainConfig
    source: DataSource
    device: torch.device
    method: Method
    model: torch.nn.Module  # the method, or its torch.compile wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    guard: StepGuard
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    base_lr: float
    total_steps: int

    def step(self, views: list[torch.Tensor], batch: dict[str, Any], i: int) -> None:
        """Training step ``i`` of the benchmark, placed mid-run in the schedules (lr, EMA momentum)."""
        step = min(self.total_steps // 2 + i, self.total_steps - 1)
        steps_per_epoch = self.total_steps / self.cfg.epochs
        apply_schedules(self.optimizer, self.cfg.optim, self.base_lr, step / steps_per_epoch, self.cfg.epochs)
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = forward_backward(self.model, views, batch, self.scaler, self.device, self.amp_dtype,
                                   self.cfg.accum_steps)
        guarded_update(self.method, self.optimizer, self.scaler, self.guard, loss, self.cfg.optim.clip_grad, False,
                       step, self.total_steps)

    def to_device(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        return [v.to(self.device, non_blocking=True, memory_format=self.memory_format) for v in views]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def small_tokenizer(directory: Path) -> Path:
    """An untrained tokenizer of the dvae small recipe's layout (beit's step costs the same with a trained one)."""
    from sslcli.models.dvae import DiscreteVAE, save_tokenizer

    cfg = build_config("dvae", "small", {})
    args = {k: v for k, v in cfg.method_args.items() if k in ("vocab", "code_dim", "widths")}
    tokenizer = DiscreteVAE(args["vocab"], args["code_dim"], tuple(args["widths"]))
    meta = {"image_size": str(cfg.augment.eval_size), "mean": json.dumps(list(cfg.augment.mean)),
            "std": json.dumps(list(cfg.augment.std))}
    return save_tokenizer(tokenizer, directory / "tokenizer.safetensors", meta)


def build(cfg: PretrainConfig, device: torch.device, memory_format: str, fused: bool | None) -> Bench:
    """The method, optimiser and scaler as ``sslcli.pretrain`` makes them (one process, seed 0)."""
    torch.manual_seed(cfg.seed)
    source = resolve_source(cfg.data, "train")
    method = build_method(cfg.method, run_encoder(cfg), cfg.method_args, num_samples=source.num_samples,
                          augment=cfg.augment, epochs=cfg.epochs)
    fmt = memory_format_for(method, device) if memory_format == "auto" else MEMORY_FORMATS[memory_format]
    method = method.to(device, memory_format=fmt).train()
    model = torch.compile(method) if cfg.compile else method
    base_lr = cfg.optim.scaled_lr(cfg.batch_size)
    optimizer = build_optimizer(method.param_groups(), cfg.optim, base_lr, fused=fused)
    amp_dtype = autocast_dtype(cfg.precision, device)
    _, steps_per_epoch = epoch_batches(source, batch_size=cfg.batch_size, options=cfg.loader)
    return Bench(cfg, source, device, method, model, optimizer, grad_scaler(device, amp_dtype),
                 StepGuard(cfg.max_bad_steps), amp_dtype, fmt, base_lr, cfg.epochs * steps_per_epoch)


def before_epoch_seconds(bench: Bench) -> float:
    """The method's per-epoch hook as the loop runs it (DeepCluster: features of every image, PCA, k-means)."""
    if type(bench.method).before_epoch is Method.before_epoch:
        return 0.0
    aug = bench.cfg.augment
    transform = eval_transform(aug.eval_size, aug.eval_crop_pct, aug.mean, aug.std)
    start = time.perf_counter()
    bench.method.before_epoch(0, lambda module: extract_features(
        module, bench.source, transform, batch_size=2 * bench.cfg.batch_size, device=bench.device,
        num_workers=bench.cfg.num_workers)[0])
    bench.method.train()
    return time.perf_counter() - start


def synthetic_batch(bench: Bench, views: MultiView) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Random views of the shapes (and memory format) the loader's batches have, on the device, with the
    metadata (indices, labels, captions) of one real batch."""
    batch = next(iter(pretrain_loader(bench.cfg, bench.source, views, 0, 0)))
    gen = torch.Generator().manual_seed(0)
    fake = [torch.randn(v.shape, generator=gen) for v in batch["views"]]
    return bench.to_device(fake), {k: v for k, v in batch.items() if k != "views"}


def time_model_step(bench: Bench, views: list[torch.Tensor], batch: dict[str, Any], steps: int,
                    warmup: int) -> dict[str, Any]:
    with PeakMemory(bench.device) as memory:
        for i in range(warmup):  # the first steps allocate optimiser state (and compile)
            bench.step(views, batch, i)
        bench.sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        for i in range(warmup, warmup + steps):
            bench.step(views, batch, i)
        bench.sync()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    size = views[0].shape[0]
    # CPU time of all this process's threads: on a shared CPU it grows far less than the wall time, so
    # with one thread it compares two variants' work even under load (benchmarks/optimisations.py).
    return {"img_per_s": round(steps * size / seconds, 1), "step_ms": round(1000 * seconds / steps, 1),
            "cpu_ms_per_step": round(1000 * cpu_seconds / steps, 1), "steps": steps, "memory": memory.result}


def time_end_to_end(bench: Bench, views: Transform | DecodeOnly, workers: int, steps: int, warmup: int,
                    make_views: ViewMaker | None = None) -> dict[str, Any]:
    """The loader (``views``: its transform) feeding the step; ``make_views`` as the loop's hook (None: move the
    loader's ``batch["views"]``)."""
    batches: Iterator[dict[str, Any]] = endless_batches(bench.cfg, bench.source, views, workers)
    waited = made = stepped = 0.0
    with PeakMemory(bench.device) as memory:
        for i in range(warmup + steps):
            tick = time.perf_counter()
            batch = next(batches)
            got = time.perf_counter()
            step_views = make_views(batch) if make_views else bench.to_device(batch["views"])
            ready = time.perf_counter()
            bench.step(step_views, batch, i)
            if i == warmup + steps - 1:
                bench.sync()  # elsewhere the guard's per-step read of its flags waits for the device
            if i >= warmup:
                waited, made, stepped = waited + got - tick, made + ready - got, stepped + time.perf_counter() - got
    batches.close()
    total = waited + stepped
    result = {"workers": workers, "img_per_s": round(steps * bench.cfg.batch_size / total, 1),
              "data_wait_fraction": round(waited / total, 3), "model_fraction": round(stepped / total, 3),
              "steps": steps, "memory": memory.result}
    if make_views is not None:
        result["views_fraction"] = round(made / total, 3)  # within model_fraction
    return result


def flops_and_peaks(bench: Bench, views: list[torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
    """FLOPs of one step (eager, whatever ``--compile`` says) and the measured matmul peaks."""
    flops = count_flops(lambda: forward_backward(bench.method, views, batch, bench.scaler, bench.device,
                                                 bench.amp_dtype, bench.cfg.accum_steps))
    bench.optimizer.zero_grad(set_to_none=True)
    dtypes = [torch.bfloat16] if bench.device.type == "cuda" else [torch.float32, torch.bfloat16]
    return {"flops_per_step": flops, "matmul_peaks": [matmul_peak(bench.device, dt) for dt in dtypes]}


def rates(result: dict[str, Any], bench: Bench) -> None:
    """Achieved FLOP/s of the model step and what share of the matmul peak that is (MFU on a GPU)."""
    model, counted = result.get("model_step"), result.get("flops")
    if not model or not counted:
        return
    achieved = counted["flops_per_step"] * model["img_per_s"] / bench.cfg.batch_size
    model["achieved_flop_per_s"] = round(achieved)
    compute = bench.amp_dtype or torch.float32
    peak = next((p for p in counted["matmul_peaks"] if p["dtype"] == str(compute).removeprefix("torch.")),
                counted["matmul_peaks"][0])
    if bench.device.type == "cuda":
        model["mfu"] = round(achieved / counted["matmul_peaks"][0]["flop_per_s"], 4)  # the dense bf16 peak
    else:
        model["mfu"] = None  # a GPU figure: a CPU's matmul rate depends on threads, cache and the other jobs
        model["fraction_of_matmul_peak"] = {"dtype": peak["dtype"], "value": round(achieved / peak["flop_per_s"], 4)}


def _ints(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    return [int(x) for x in text.split(",") if x != ""]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help="a method or a recipe that names one (seer)")
    p.add_argument("--recipe", default="small", help="a variant, a YAML file, or 'paper' (the paper's defaults)")
    p.add_argument("--data", required=True)
    p.add_argument("--arch")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="intra-op CPU threads (default: torch's, one per core)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model, as pretrain --compile")
    p.add_argument("--memory-format", choices=["auto", *MEMORY_FORMATS], default="auto",
                   help="auto: the engine's choice (sslcli.engine.device.memory_format_for)")
    p.add_argument("--optimizer-impl", choices=["auto", "fused", "unfused"], default="auto",
                   help="auto: the engine's choice (sslcli.engine.optim.build_optimizer)")
    p.add_argument("--global-size", type=int, help="global crop side (pretrain --global-size)")
    p.add_argument("--local-size", type=int, help="local crop side (pretrain --local-size)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override, as pretrain --set")
    p.add_argument("--augment-on", choices=["workers", "device"],
                   help="where views are augmented, as pretrain --augment-on (default: the recipe's, workers)")
    p.add_argument("--workers", type=_ints, default=[0, 1, 2], help="data-pipeline worker counts, e.g. 0,1,2")
    p.add_argument("--e2e-workers", type=_ints, help="worker counts of the end-to-end runs (default: the recipe's)")
    p.add_argument("--phases", default="data,model,e2e,flops", help="a subset of data,model,e2e,flops")
    p.add_argument("--steps", type=int, default=20, help="timed batches per phase")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches before each phase")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def build_from_args(args: argparse.Namespace, tmp: Path) -> Bench:
    """The bench that the command line describes (``tmp`` holds beit's stand-in tokenizer)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {"data": args.data, "arch": args.arch, "batch_size": args.batch_size, "precision": args.precision,
               "compile": args.compile or None, "augment_on": args.augment_on}
    sets = list(args.sets)
    if args.method == "beit" and not any(s.startswith("method_args.tokenizer=") for s in sets):
        sets.append(f"method_args.tokenizer={small_tokenizer(tmp)}")
    recipe = None if args.recipe == "paper" else args.recipe  # the recipe file's own (paper) defaults
    cfg = build_config(args.method, recipe, options, sets,
                       CropOptions(global_size=args.global_size, local_size=args.local_size))
    fused = {"auto": None, "fused": True, "unfused": False}[args.optimizer_impl]
    return build(cfg, resolve_device(args.device), args.memory_format, fused)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    phases = set(args.phases.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        bench = build_from_args(args, Path(tmp))
        cfg, device = bench.cfg, bench.device
        result: dict[str, Any] = {"command": " ".join(["python -m benchmarks.throughput", *(argv or sys.argv[1:])]),
                                  "machine": describe(device)}
        views = MultiView(cfg.augment, bench.method.extra_fields())
        fake_views, meta = synthetic_batch(bench, views)  # MultiView's shapes: the device path's too
        transform, make_views = training_views(cfg.augment_on, cfg.augment, bench.method, device)
        result["setup"] = {
            "method": cfg.method, "recipe": args.recipe,
            "arch": cfg.arch if bench.method.backbone is not None else None,
            "batch_size": cfg.batch_size, "views": [list(v.shape[1:]) for v in fake_views],
            "augment_on": cfg.augment_on,
            "precision": str(bench.amp_dtype or torch.float32).removeprefix("torch."), "compile": cfg.compile,
            "memory_format": "channels_last" if bench.memory_format == torch.channels_last else "contiguous",
            "optimizer": type(bench.optimizer).__name__,
            "optimizer_fused": bool(bench.optimizer.param_groups[0].get("fused")),
            "parameters": sum(p.numel() for p in bench.method.parameters()), "config": to_dict(cfg)}
        result["before_epoch_s"] = round(before_epoch_seconds(bench), 2)
        if "flops" in phases:
            result["flops"] = flops_and_peaks(bench, fake_views, meta)
        if "data" in phases:
            result["data_pipeline"] = [time_pipeline(cfg, bench.source, transform, w, args.steps, args.warmup)
                                       for w in args.workers]
        if "model" in phases:
            result["model_step"] = time_model_step(bench, fake_views, meta, args.steps, args.warmup)
        if "e2e" in phases:
            result["end_to_end"] = [time_end_to_end(bench, transform, w, args.steps, args.warmup, make_views)
                                    for w in args.e2e_workers or [cfg.num_workers]]
        rates(result, bench)
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    return result


if __name__ == "__main__":
    main()
