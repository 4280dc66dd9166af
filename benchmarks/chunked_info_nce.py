"""Time and peak memory of MoCo's loss, `info_nce` against `info_nce_chunked` (issue 10).

    python -m benchmarks.chunked_info_nce --n 256 --k 4096 --k 65536 --dim 128 --chunk 4096 --chunk 8192 \\
        --chunk 16384 --threads 1 --out benchmarks/results/chunked_info_nce.json

The step measured is MoCo's: a query ``[N, D]`` that requires grad, a key ``[N, D]`` and a queue ``[K, D]``
that do not, loss forward + backward.

*Time*: both variants in this process, warmed up, then ``--rounds`` rounds alternating between them
(``--reps`` calls each) so that load from other jobs on a shared machine hits all of them alike; the
median and the best call of all rounds, wall clock and, on the CPU, the process's CPU time.

*Memory*: each (K, variant) in a fresh child process.  On CUDA ``torch.cuda.max_memory_allocated``
during one call minus the memory allocated before it.  On the CPU the resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs`` after a warm-up call) minus the RSS before the call,
with glibc's ``MALLOC_MMAP_THRESHOLD_`` set to 64 KiB in the child so that every tensor buffer is its own
mapping, returned to the system when freed: the RSS then follows the live tensors instead of keeping
freed blocks in the heap (the timing runs keep the default allocator).  *Saved for backward* is exact:
the bytes of the distinct tensors autograd keeps between the two passes (``saved_tensors_hooks``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import describe, reset_rss_peak, status_kib
from sslcli.atomic import atomic_path
from sslcli.losses import info_nce
from sslcli.losses.chunked import info_nce_chunked

TEMPERATURE = 0.2  # MoCo v2's


def variants(chunks: list[int]) -> dict[str, Callable[..., torch.Tensor]]:
    """Name -> loss(query, key, queue, t); ``info_nce`` is the reference."""
    named: dict[str, Callable[..., torch.Tensor]] = {"info_nce": info_nce}
    for chunk in chunks:
        named[f"chunked_{chunk}"] = lambda q, k, n, t, c=chunk: info_nce_chunked(q, k, n, t, chunk_size=c)
    return named


def inputs(n: int, k: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    query = torch.randn(n, dim, generator=g).to(device).requires_grad_()
    key = torch.randn(n, dim, generator=g).to(device)
    queue = torch.randn(k, dim, generator=g).to(device)
    return query, key, queue


def step(loss_fn: Callable[..., torch.Tensor], query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor) -> None:
    query.grad = None
    loss_fn(query, key, queue, TEMPERATURE).backward()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_bytes(loss_fn: Callable[..., torch.Tensor], query: torch.Tensor, key: torch.Tensor,
                queue: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward during the forward pass."""
    storages: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = loss_fn(query, key, queue, TEMPERATURE)
    del loss
    return sum(storages.values())


def time_variants(named: dict[str, Callable[..., torch.Tensor]], n: int, k: int, dim: int, device: torch.device,
                  rounds: int, reps: int) -> dict[str, dict[str, Any]]:
    query, key, queue = inputs(n, k, dim, device)
    for fn in named.values():  # allocations, kernel selection, thread pools
        for _ in range(2):
            step(fn, query, key, queue)
    sync(device)
    wall: dict[str, list[float]] = {name: [] for name in named}
    cpu: dict[str, list[float]] = {name: [] for name in named}
    for _ in range(rounds):
        for name, fn in named.items():
            for _ in range(reps):
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                step(fn, query, key, queue)
                sync(device)
                wall[name].append(time.perf_counter() - start_wall)
                cpu[name].append(time.process_time() - start_cpu)
    with torch.no_grad():
        losses = {name: float(fn(query, key, queue, TEMPERATURE)) for name, fn in named.items()}
    return {name: {"wall_ms_median": round(1000 * statistics.median(wall[name]), 2),
                   "wall_ms_best": round(1000 * min(wall[name]), 2),
                   "cpu_ms_median": round(1000 * statistics.median(cpu[name]), 2) if device.type == "cpu" else None,
                   "loss": losses[name], "calls": len(wall[name])} for name in named}


def child(name: str, n: int, k: int, dim: int, chunks: list[int], device: torch.device) -> dict[str, Any]:
    """Peak memory of one forward + backward of ``name``, in this (fresh) process."""
    fn = variants(chunks)[name]
    query, key, queue = inputs(n, k, dim, device)
    step(fn, query, key, queue)  # warm-up: thread pools, oneDNN / cuBLAS workspaces, query.grad
    saved = saved_bytes(fn, query, key, queue)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(fn, query, key, queue)
        sync(device)
        peak, source = torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated"
    else:
        reset = reset_rss_peak()
        before_kib = status_kib("VmRSS") or 0
        step(fn, query, key, queue)
        peak = ((status_kib("VmHWM") or 0) - before_kib) * 1024
        source = "VmHWM - VmRSS before the call" if reset else "VmHWM (not resettable: lifetime peak)"
    return {"variant": name, "k": k, "peak_increase_mib": round(peak / 2**20, 1),
            "saved_for_backward_mib": round(saved / 2**20, 2), "memory_source": source}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="queries per step (per GPU in MoCo)")
    parser.add_argument("--k", type=int, action="append", help="queue size; repeat (default 4096 and 65536)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, action="append", help="chunk size; repeat (default 8192)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--child", metavar="VARIANT:K", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, chunks, ks = torch.device(args.device), args.chunk or [8192], args.k or [4096, 65536]
    if args.child:
        name, k = args.child.rsplit(":", 1)
        print(json.dumps(child(name, args.n, int(k), args.dim, chunks, device)))
        return
    machine = describe(device)
    named = variants(chunks)
    rows = []
    for k in ks:
        timing = time_variants(named, args.n, k, args.dim, device, args.rounds, args.reps)
        for name in named:
            cmd = [sys.executable, "-m", "benchmarks.chunked_info_nce", "--child", f"{name}:{k}", "--n", str(args.n),
                   "--dim", str(args.dim), "--device", args.device, "--threads", str(args.threads),
                   *[f"--chunk={c}" for c in chunks]]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            memory = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
            rows.append({"n": args.n, "k": k, "dim": args.dim, **timing[name], **memory,
                         "logits_mib": round(4 * args.n * (k + 1) / 2**20, 1)})
            print(json.dumps(rows[-1]), flush=True)
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {"machine": machine, "temperature": TEMPERATURE, "rounds": args.rounds, "reps": args.reps, "rows": rows}
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
