"""kNN accuracy reached by the `small` recipes on the embedded dataset, against the baselines.

    python -m benchmarks.demo_accuracy --workdir /tmp/bench --methods mocov3 instdisc --epochs 6

Runs exactly what a user runs (`sslcli data synth`, `pretrain --recipe small`, `knn`) and collects
the results JSON of each; the table goes into docs/benchmarks.md.  It is also the learning check of
every method: it exits with status 1, naming the methods, when one does not beat the random-init
encoder's kNN top-1 by ``--margin``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SSLCLI = [sys.executable, "-m", "sslcli"]


def run(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([*SSLCLI, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    parser.add_argument("--epochs", type=int, default=None, help="override the small recipes' epochs")
    parser.add_argument("--margin", type=float, default=0.04, help="required kNN top-1 gain over random init")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_accuracy.json"))
    args = parser.parse_args()
    from sslcli.methods import METHODS

    methods = args.methods or sorted(METHODS)
    work, data = args.workdir, args.workdir / "data"
    rows = []
    if not (data / "index.json").exists():
        run("data", "synth", str(data))
    baselines = {"random init (resnet18)": ["--arch", "resnet18", "--random-init"], "raw pixels": ["--raw-pixels"]}
    for name, flags in baselines.items():
        out = work / f"knn-{flags[-1].strip('-')}.json"
        run("knn", *flags, "--image-size", "32", "--crop-pct", "1.0", "--data", str(data), "--out", str(out))
        rows.append({"encoder": name, "pretrain_s": 0.0, **json.loads(out.read_text())["metrics"]})
    for method in methods:
        epochs = ["--epochs", str(args.epochs)] if args.epochs else []
        seconds = run("pretrain", method, "--recipe", "small", "--data", str(data), "--out", str(work / method),
                      "--overwrite", *epochs)
        out = work / f"knn-{method}.json"
        run("knn", str(work / method), "--data", str(data), "--out", str(out))
        rows.append({"encoder": f"{method} (small recipe)", "method": method, "pretrain_s": round(seconds, 1),
                     "epochs": args.epochs, **json.loads(out.read_text())["metrics"]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print("| encoder | pretrain time (s) | kNN top-1 | kNN top-5 |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['encoder']} | {r['pretrain_s']} | {r['top1']:.1%} | {r['top5']:.1%} |")
    floor = rows[0]["top1"] + args.margin
    failed = [r["method"] for r in rows if "method" in r and r["top1"] < floor]
    if failed:
        sys.exit(f"no clear gain over random init (top-1 < {floor:.1%}): {', '.join(failed)}")


if __name__ == "__main__":
    main()
