"""Time and peak memory of `knn_classify` against a large memory of random features.

    python -m benchmarks.knn_memory --memory 1000000 --memory 250000 --queries 10000 --dim 128 --classes 1000 \\
        --out benchmarks/results/knn_memory.json

Each (memory size, chunking) runs in a fresh child process, which builds its random features, then
classifies the queries once.  Memory is the resident-set high-water mark (``VmHWM`` in
``/proc/self/status``), reset after the features are built (``/proc/self/clear_refs``), so
``peak_over_features`` is what the classification itself adds on top of the features.  RSS, and not
tracemalloc, because tracemalloc sees only Python's allocator, not torch's tensors or BLAS workspaces;
RSS counts every page the process touches.

Modes: ``chunked`` uses `knn_evaluate`'s defaults (1024 queries x 65,536 memory items at a time);
``unchunked`` compares each 1024-query chunk with the whole memory at once (``memory_chunk_size=None``).
A mode whose similarity block alone (``4 B x chunk x items``) would exceed ``--max-gib`` is not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.machine import reset_rss_peak, status_kib
from sslcli.atomic import atomic_path
from sslcli.evaluation.knn import knn_classify

QUERY_CHUNK = 1024  # knn_classify's and knn_evaluate's default
MEMORY_CHUNK = 65536  # knn_evaluate's default
MODES = {"chunked": MEMORY_CHUNK, "unchunked": None}


def child(memory: int, mode: str, queries: int, dim: int, classes: int, ks: list[int]) -> dict:
    """One measurement in this (fresh) process."""
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(memory, dim, generator=gen)
    train_y = torch.randint(0, classes, (memory,), generator=gen)
    test = torch.randn(queries, dim, generator=gen)
    features_mib = (train.nbytes + train_y.nbytes + test.nbytes) / 2**20
    reset = reset_rss_peak()
    before = status_kib("VmRSS")
    start = time.perf_counter()
    scores = knn_classify(train, train_y, test, k=ks, temperature=0.07, num_classes=classes,
                          chunk_size=QUERY_CHUNK, memory_chunk_size=MODES[mode])
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    assert all(s.shape == (queries, classes) for s in scores.values())
    return {"memory": memory, "mode": mode, "queries": queries, "dim": dim, "classes": classes, "k": ks,
            "query_chunk": QUERY_CHUNK, "memory_chunk": MODES[mode], "seconds": round(seconds, 2),
            "queries_per_s": round(queries / seconds, 1), "features_mib": round(features_mib, 1),
            "rss_before_mib": round(before / 1024, 1), "peak_rss_mib": round(peak / 1024, 1),
            "peak_over_features_mib": round((peak - before) / 1024, 1), "peak_was_reset": reset,
            "similarity_block_mib": round(4 * QUERY_CHUNK * min(memory, MODES[mode] or memory) / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", type=int, action="append", help="memory (train) size; repeat for several")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--k", type=int, action="append", help="neighbours; repeat (default 20 and 200)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--max-gib", type=float, default=10.0, help="skip modes whose similarity block is larger")
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--child", nargs=2, metavar=("MEMORY", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    ks = args.k or [20, 200]
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.queries, args.dim, args.classes, ks)))
        return
    rows = []
    for memory in args.memory or [1_000_000, 250_000]:
        for mode in args.modes:
            block_gib = 4 * QUERY_CHUNK * min(memory, MODES[mode] or memory) / 2**30
            if block_gib > args.max_gib:
                rows.append({"memory": memory, "mode": mode, "skipped": f"similarity block {block_gib:.1f} GiB"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            cmd = [sys.executable, "-m", "benchmarks.knn_memory", "--child", str(memory), mode, "--queries",
                   str(args.queries), "--dim", str(args.dim), "--classes", str(args.classes),
                   *[f"--k={k}" for k in ks]]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
            print(json.dumps(rows[-1]), flush=True)
    # Not run at any size: all queries against the whole memory at once, the Q x N matrix chunking avoids.
    whole_gib = 4 * args.queries * max(args.memory or [1_000_000]) / 2**30
    report = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "not_run": f"all {args.queries} queries x the whole memory at once: a {whole_gib:.1f} GiB matrix",
              "rows": rows}
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
