"""Before / after figures of the training step's optimisations, measured in one process, alternating.

    python -m benchmarks.optimisations --data DIR --rounds 3 --steps 10 --out benchmarks/results/optimisations-cpu.json

Each optimisation is a pair of ``benchmarks.throughput`` command lines that differ in one switch. Both
benches are built side by side and their model steps (random views on the device, the loop's own step)
are timed in turn, ``--rounds`` times, so that a burst of load from other jobs on a shared machine hits
both; the best round of each is reported. Numerical equality of each kept path with the reference
path is checked by tests/test_optimised_paths.py (and test_step_guards.py for ``--compile``), not here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import describe
from benchmarks.throughput import build_from_args, parse_args, synthetic_batch, time_model_step
from sslcli.augment import MultiView
from sslcli.engine.device import resolve_device
from sslcli.engine.optim import OptimConfig, apply_schedules, build_optimizer, param_groups
from sslcli.models.encoders import create_encoder

# (name, the bench's common arguments, before, after): before is the engine's path before issue 10.
OPTIMISATIONS: list[tuple[str, list[str], list[str], list[str]]] = [
    ("fused AdamW (MAE, ViT-Tiny/8)", ["--method", "mae"], ["--optimizer-impl", "unfused"],
     ["--optimizer-impl", "fused"]),
    ("fused SGD (MoCo v2 with SGD, ResNet-18)", ["--method", "mocov2", "--set", "optim.name=sgd"],
     ["--optimizer-impl", "unfused"], ["--optimizer-impl", "fused"]),
    ("channels_last (SimCLR, ResNet-18)", ["--method", "simclr"], ["--memory-format", "contiguous"],
     ["--memory-format", "channels_last"]),
    ("contiguous, not channels_last (MAE, ViT-Tiny/8)", ["--method", "mae"], ["--memory-format", "channels_last"],
     ["--memory-format", "contiguous"]),
    ("bf16 autocast (SimCLR, ResNet-18)", ["--method", "simclr"], ["--precision", "fp32"], ["--precision", "bf16"]),
    ("bf16 autocast (MAE, ViT-Tiny/8)", ["--method", "mae"], ["--precision", "fp32"], ["--precision", "bf16"]),
    ("torch.compile (SimCLR, ResNet-18)", ["--method", "simclr"], [], ["--compile"]),
]


def compare(common: list[str], before: list[str], after: list[str], rounds: int, steps: int,
            warmup: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        benches = []
        for extra in (before, after):
            args = parse_args([*common, *extra, "--steps", str(steps), "--warmup", str(warmup)])
            bench = build_from_args(args, Path(tmp))
            views, meta = synthetic_batch(bench, MultiView(bench.cfg.augment, bench.method.extra_fields()))
            time_model_step(bench, views, meta, 1, warmup)  # allocations, kernel choice, compilation
            benches.append((bench, views, meta))
        runs: list[list[dict[str, Any]]] = [[], []]
        for _ in range(rounds):
            for k, (bench, views, meta) in enumerate(benches):
                runs[k].append(time_model_step(bench, views, meta, steps, 0))
    sides = []
    for extra, side in zip((before, after), runs):
        rates, cpu = [r["img_per_s"] for r in side], [r["cpu_ms_per_step"] for r in side]
        sides.append({"args": extra, "img_per_s": rates, "best": max(rates), "median": statistics.median(rates),
                      "cpu_ms_per_step": cpu, "best_cpu_ms": min(cpu)})
    return {"before": sides[0], "after": sides[1],
            "speedup_best": round(sides[1]["best"] / sides[0]["best"], 3),
            "speedup_median": round(sides[1]["median"] / sides[0]["median"], 3),
            "speedup_cpu_time": round(sides[0]["best_cpu_ms"] / sides[1]["best_cpu_ms"], 3)}


def optimiser_step_ms(arch: str, name: str, fused: bool, device: torch.device, repeats: int = 5,
                      steps: int = 10) -> float:
    """Milliseconds of ``optimizer.step()`` alone over ``arch``'s parameters with random gradients (best of
    ``repeats`` runs of ``steps``): the part of a step the fused kernels change."""
    torch.manual_seed(0)
    encoder = create_encoder(arch, img_size=64).to(device)
    for p in encoder.parameters():
        p.grad = torch.randn_like(p)
    cfg = OptimConfig(name=name, weight_decay=1e-4)  # type: ignore[arg-type]
    optimizer = build_optimizer(param_groups(encoder), cfg, 0.1, fused=fused)
    apply_schedules(optimizer, cfg, 0.1, 0.0, 1.0)
    for _ in range(3):  # state allocation
        optimizer.step()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / steps)
    return round(1000 * best, 2)


def optimiser_rows(device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for arch in ("resnet18", "vit_tiny_p8"):
        for name, impls in (("adamw", (False, True)), ("sgd", (False, True)), ("lars", (False,))):
            for fused in impls:
                ms = optimiser_step_ms(arch, name, fused, device)
                rows.append({"arch": arch, "optimizer": name, "fused": fused, "step_ms": ms})
                print(f"| optimiser step alone | {arch} {name}{' fused' if fused else ''} | {ms} ms |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--global-size", default="64", help="crop side of every bench (the issue's 64 px)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="intra-op threads; 1 makes CPU time a fair measure under load")
    parser.add_argument("--only", nargs="*", help="names (or a word of them) of the optimisations to measure; "
                        "'optimiser' for the optimiser step alone")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    machine = describe(resolve_device(args.device))
    rows = []
    for name, common, before, after in OPTIMISATIONS:
        if args.only and not any(word in name for word in args.only):
            continue
        base = [*common, "--data", args.data, "--global-size", args.global_size, "--device", args.device,
                *(["--threads", str(args.threads)] if args.threads else [])]
        row = {"name": name, "command": " ".join(["python -m benchmarks.throughput", *base]),
               **compare(base, before, after, args.rounds, args.steps, args.warmup)}
        rows.append(row)
        print(f"| {name} | {' '.join(before) or 'default'} -> {' '.join(after)} | {row['before']['best']} -> "
              f"{row['after']['best']} | x{row['speedup_best']} (median x{row['speedup_median']}; CPU time "
              f"x{row['speedup_cpu_time']}) |", flush=True)
    alone = optimiser_rows(resolve_device(args.device)) if not args.only or "optimiser" in args.only else []
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "threads": args.threads or torch.get_num_threads(),
                                        "rounds": args.rounds, "steps": args.steps,
                                        "optimisations": rows, "optimiser_step_alone": alone}, indent=2) + "\n")


if __name__ == "__main__":
    main()
