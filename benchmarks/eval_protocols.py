"""Acceptance check of the evaluation protocols on the embedded data: kNN, linear probe and fine-tuning
of a SimCLR encoder against the same architecture at random init, plus fine-tuning on 1% and 10% of the labels.

    python -m benchmarks.eval_protocols --workdir /tmp/evalp [--run RUN] [--pretrain-epochs 3]

Runs what a user runs (`sslcli pretrain simclr --recipe small`, `knn`, `linear-probe`, `finetune`, `report`)
and exits with status 1, naming the failed comparison, unless

    finetune top-1 > linear-probe top-1 > linear-probe top-1 of the random-init encoder, and
    finetune on 10% of the labels > finetune on 1%.

Writes every results file under WORKDIR/results, a summary JSON (``--out``) and prints `sslcli report`'s table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.demo_accuracy import run
from sslcli.data.synth import generate_synthetic
from sslcli.evaluation.report import build_report, print_report, to_markdown


def _top1(path: Path) -> float:
    return float(json.loads(path.read_text())["metrics"]["top1"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--run", type=Path, default=None, help="an existing SimCLR run to evaluate (no pretraining)")
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=3, help="fine-tuning epochs with all labels")
    parser.add_argument("--fraction-epochs", type=int, default=10, help="fine-tuning epochs on 1% / 10% of the labels")
    parser.add_argument("--min-scale", type=float, default=0.5, help="fine-tuning crops (0.5 for the 64-px data)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_protocols.json"))
    args = parser.parse_args()
    work, data, res = args.workdir, args.workdir / "data", args.workdir / "results"
    if not (data / "index.json").exists():
        generate_synthetic(data)  # the default embedded data: 10,000 train / 2,000 test images of 64 px
    seconds: dict[str, float] = {}
    encoder = args.run or work / "simclr"
    if args.run is None:
        seconds["pretrain"] = run("pretrain", "simclr", "--recipe", "small", "--data", str(data), "--out",
                                  str(encoder), "--epochs", str(args.pretrain_epochs), "--overwrite")
    common = ["--data", str(data)]
    tuning = ["--min-scale", str(args.min_scale), "--overwrite", *common]
    for name, flags in {"": [], "-random": ["--random-init"]}.items():
        seconds[f"knn{name}"] = run("knn", str(encoder), *flags, *common, "--out", str(res / f"knn{name}.json"))
        seconds[f"linear-probe{name}"] = run("linear-probe", str(encoder), *flags, *common,
                                             "--out", str(res / f"linear-probe{name}.json"))
        seconds[f"finetune{name}"] = run("finetune", str(encoder), *flags, *tuning, "--epochs",
                                         str(args.finetune_epochs), "--eval-every", "1", "--out", str(work / f"ft{name}"))
    for fraction in (0.01, 0.1):
        seconds[f"finetune-{fraction:g}"] = run(
            "finetune", str(encoder), *tuning, "--label-fraction", str(fraction), "--epochs", str(args.fraction_epochs),
            "--out", str(work / f"ft-{fraction:g}"))

    top1 = {"knn": _top1(res / "knn.json"), "knn-random": _top1(res / "knn-random.json"),
            "linear-probe": _top1(res / "linear-probe.json"), "linear-probe-random": _top1(res / "linear-probe-random.json"),
            "finetune": _top1(work / "ft" / "results.json"), "finetune-random": _top1(work / "ft-random" / "results.json"),
            "finetune-1%": _top1(work / "ft-0.01" / "results.json"), "finetune-10%": _top1(work / "ft-0.1" / "results.json")}
    checks = {
        "finetune > linear-probe": top1["finetune"] > top1["linear-probe"],
        "linear-probe > random-init linear-probe": top1["linear-probe"] > top1["linear-probe-random"],
        "finetune 10% labels > 1% labels": top1["finetune-10%"] > top1["finetune-1%"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"encoder": str(encoder), "args": {k: str(v) for k, v in vars(args).items()},
                                    "top1": top1, "seconds": {k: round(v, 1) for k, v in seconds.items()},
                                    "checks": checks}, indent=2) + "\n")
    table = build_report([res, *(work / d for d in ("ft", "ft-random", "ft-0.01", "ft-0.1"))])
    print_report(table)
    print(to_markdown(table))
    print(" ".join(f"{k} {v:.0f} s;" for k, v in seconds.items()))
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        sys.exit("failed: " + "; ".join(failed) + f" (top-1: {json.dumps({k: round(v, 4) for k, v in top1.items()})})")
    print("all checks passed: " + "; ".join(checks))


if __name__ == "__main__":
    main()
