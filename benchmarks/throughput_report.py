"""Markdown tables from results files of ``benchmarks.throughput`` (what docs/benchmarks.md shows).

    python -m benchmarks.throughput_report benchmarks/results/throughput-cpu-*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _views(setup: dict[str, Any]) -> str:
    """``2 x 64 px + 4 x 32 px`` from the views' shapes."""
    sizes = [shape[-1] for shape in setup["views"]]
    groups: list[list[int]] = []
    for size in sizes:
        if groups and groups[-1][0] == size:
            groups[-1][1] += 1
        else:
            groups.append([size, 1])
    return " + ".join(f"{count} x {size} px" for size, count in groups)


def _mib(memory: dict[str, Any] | None) -> str:
    if not memory:
        return ""
    return f"{memory['peak_mib']:,.0f}" + (f" (+{memory['increase_mib']:,.0f})" if memory.get("increase_mib") else "")


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _load(r: dict[str, Any]) -> str:
    """The 1-minute load average at the run's start and end: above the core count, other jobs shared them."""
    m = r["machine"]
    return f"{m['load_average_start'][0]} / {m.get('load_average_end', ['?'])[0]}"


def model_row(r: dict[str, Any]) -> str:
    s, model, flops = r["setup"], r.get("model_step") or {}, r.get("flops") or {}
    e2e = max(r.get("end_to_end") or [{}], key=lambda e: e.get("workers", -1))
    counted = per_image = ""
    if flops and model:
        share = model.get("mfu") if model.get("mfu") is not None else model["fraction_of_matmul_peak"]["value"]
        per_image = f"{flops['flops_per_step'] / s['batch_size'] / 1e9:.3f}"
        counted = f"{model['achieved_flop_per_s'] / 1e9:.1f} ({_pct(share)})"
    return (f"| {s['method']} | {s['arch'] or 'own networks'} | {_views(s)} | {s['batch_size']} | {s['precision']} | "
            f"{model.get('img_per_s', '')} | {e2e.get('img_per_s', '')} ({e2e.get('workers', '')}) | "
            f"{_pct(e2e.get('model_fraction'))} / {_pct(e2e.get('data_wait_fraction'))} | {per_image} | {counted} | "
            f"{_mib(model.get('memory'))} | {_load(r)} |")


MODEL_HEADER = ("| method | arch | views | batch | precision | model step img/s | end-to-end img/s (workers) | "
                "model / data-wait share | GFLOP per image | achieved GFLOP/s (of matmul peak) | "
                "peak memory MiB (model step; + over start) | load average (start / end) |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|")


def pipeline_rows(results: list[dict[str, Any]]) -> str:
    counts = sorted({p["workers"] for r in results for p in r.get("data_pipeline", [])})
    lines = ["| method | views | " + " | ".join(f"{w} worker{'s' if w != 1 else ''} img/s" for w in counts) + " |",
             "|---|---|" + "---|" * len(counts)]
    for r in results:
        by = {p["workers"]: p["img_per_s"] for p in r.get("data_pipeline", [])}
        if by:
            lines.append(f"| {r['setup']['method']} | {_views(r['setup'])} | "
                         + " | ".join(str(by.get(w, "")) for w in counts) + " |")
    return "\n".join(lines)


def e2e_rows(results: list[dict[str, Any]]) -> str:
    lines = ["| method | workers | end-to-end img/s | model share | data-wait share |", "|---|---|---|---|---|"]
    for r in results:
        for e in r.get("end_to_end", []):
            lines.append(f"| {r['setup']['method']} | {e['workers']} | {e['img_per_s']} | "
                         f"{_pct(e['model_fraction'])} | {_pct(e['data_wait_fraction'])} |")
    return "\n".join(lines)


def machine_line(r: dict[str, Any]) -> str:
    m = r["machine"]
    return (f"{m['cpu']}, {m['cpu_cores_usable']} cores, {m['memory_gib']} GiB; device {m['device_name']}; torch "
            f"{m['torch']}, {m['torch_threads']} threads")


def optimisation_rows(results: list[dict[str, Any]]) -> str:
    """``benchmarks.optimisations`` files: model-step img/s before and after each switch (best round)."""
    lines = ["| optimisation | switch (before -> after) | model step img/s, before -> after (best of rounds) | "
             "speed-up (best; median) | load average (start / end) |", "|---|---|---|---|---|"]
    for r in results:
        for o in r["optimisations"]:
            switch = f"{' '.join(o['before']['args']) or 'default'} -> {' '.join(o['after']['args'])}"
            lines.append(f"| {o['name']} | `{switch}` | {o['before']['best']} -> {o['after']['best']} | "
                         f"x{o['speedup_best']}; x{o['speedup_median']} | {_load(r)} |")
    return "\n".join(lines)


def optimiser_alone_rows(results: list[dict[str, Any]]) -> str:
    """The optimiser step alone (``benchmarks.optimisations``): ms per step, torch's default vs fused."""
    lines = ["| parameters of | optimiser | default ms | fused ms |", "|---|---|---|---|"]
    for r in results:
        by: dict[tuple[str, str], dict[bool, float]] = {}
        for row in r.get("optimiser_step_alone", []):
            by.setdefault((row["arch"], row["optimizer"]), {})[row["fused"]] = row["step_ms"]
        for (arch, name), ms in by.items():
            lines.append(f"| {arch} | {name} | {ms.get(False, '')} | {ms.get(True, 'none')} |")
    return "\n".join(lines)


def summary(r: dict[str, Any]) -> str:
    """One run, as the rows docs/benchmarks.md shows."""
    parts = [machine_line(r), MODEL_HEADER, model_row(r)]
    if r.get("data_pipeline"):
        parts.append(pipeline_rows([r]))
    if r.get("end_to_end"):
        parts.append(e2e_rows([r]))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    loaded = [json.loads(path.read_text()) for path in parser.parse_args().files]
    results = [r for r in loaded if "setup" in r]
    optimisations = [r for r in loaded if "optimisations" in r]
    for machine in sorted({machine_line(r) for r in results}):
        print(f"- {machine}")
    print()
    print("\n".join([MODEL_HEADER, *(model_row(r) for r in results)]))
    print()
    print(pipeline_rows(results))
    print()
    print(e2e_rows(results))
    if any(r["optimisations"] for r in optimisations):
        print()
        print(optimisation_rows(optimisations))
    if any(r.get("optimiser_step_alone") for r in optimisations):
        print()
        print(optimiser_alone_rows(optimisations))


if __name__ == "__main__":
    main()
