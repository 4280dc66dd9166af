"""kNN accuracy reached by the `small` recipes on the embedded dataset, against the baselines.

    python -m benchmarks.demo_accuracy --workdir /tmp/bench --methods mocov3 instdisc --epochs 6

Runs exactly what a user runs (`sslcli data synth`, `pretrain --recipe small`, `knn`) and collects
the results JSON of each; the table goes into docs/benchmarks.md.  It is also the learning check of
every method: it exits with status 1, naming the methods, when one does not beat a random-init
encoder of its own architecture and preprocessing (``knn RUN --random-init``) by ``--margin`` kNN top-1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SSLCLI = [sys.executable, "-m", "sslcli"]
# Two-stage methods: the first stage's method and the method_args key that takes its run directory.
PREREQUISITES = {"beit": ("dvae", "tokenizer")}


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
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the random-init ResNet-18 and raw-pixel rows (when running methods one by one)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_accuracy.json"))
    args = parser.parse_args()
    from sslcli.methods import METHODS

    # A method without a backbone (the dVAE tokenizer) has nothing to evaluate by kNN; it runs as a prerequisite.
    methods = args.methods or sorted(name for name, cls in METHODS.items() if cls.has_backbone)
    work, data = args.workdir, args.workdir / "data"
    rows = []
    if not (data / "index.json").exists():
        run("data", "synth", str(data))
    baselines = {"random init (resnet18)": ["--arch", "resnet18", "--random-init"], "raw pixels": ["--raw-pixels"]}
    for name, flags in ({} if args.no_baselines else baselines).items():
        out = work / f"knn-{flags[-1].strip('-')}.json"
        run("knn", *flags, "--image-size", "32", "--crop-pct", "1.0", "--data", str(data), "--out", str(out))
        rows.append({"encoder": name, "pretrain_s": 0.0, **json.loads(out.read_text())["metrics"]})
    for method in methods:
        epochs = ["--epochs", str(args.epochs)] if args.epochs else []
        extra, seconds = [], 0.0
        if method in PREREQUISITES:  # its first stage, with the small recipe's own epochs; timed with the method
            first, key = PREREQUISITES[method]
            seconds += run("pretrain", first, "--recipe", "small", "--data", str(data), "--out", str(work / first),
                           "--overwrite")
            extra = ["--set", f"method_args.{key}={work / first}"]
        seconds += run("pretrain", method, "--recipe", "small", "--data", str(data), "--out", str(work / method),
                       "--overwrite", *epochs, *extra)
        out, rand = work / f"knn-{method}.json", work / f"knn-{method}-random-init.json"
        run("knn", str(work / method), "--data", str(data), "--out", str(out))
        # The method's own architecture and preprocessing with random weights (a layer-norm ResNet for CPC,
        # a dilated one for DenseCL, a 1-channel L encoder for CMC): the baseline its gain is measured from.
        run("knn", str(work / method), "--random-init", "--data", str(data), "--out", str(rand))
        rows.append({"encoder": f"{method} (small recipe)", "method": method, "pretrain_s": round(seconds, 1),
                     "epochs": args.epochs, "random_init_top1": json.loads(rand.read_text())["metrics"]["top1"],
                     **json.loads(out.read_text())["metrics"]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print("| encoder | pretrain time (s) | kNN top-1 | kNN top-5 | same architecture, random init |")
    print("|---|---|---|---|---|")
    for r in rows:
        rand = f"{r['random_init_top1']:.1%}" if "random_init_top1" in r else ""
        print(f"| {r['encoder']} | {r['pretrain_s']} | {r['top1']:.1%} | {r['top5']:.1%} | {rand} |")
    failed = [f"{r['method']} ({r['top1']:.1%} vs {r['random_init_top1']:.1%})" for r in rows
              if "method" in r and r["top1"] < r["random_init_top1"] + args.margin]
    if failed:
        sys.exit(f"no clear gain (>= {args.margin:.0%} top-1) over the same architecture at random init: "
                 f"{', '.join(failed)}")


if __name__ == "__main__":
    main()
