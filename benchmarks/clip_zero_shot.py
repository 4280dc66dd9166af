"""CLIP's learning check on the embedded data: zero-shot top-1 on held-out images and on unseen colour-shape
pairs, retrieval recall@5, and the few-shot curve, each against its chance level.

    python -m benchmarks.clip_zero_shot --workdir /tmp/bench-clip     # the small recipe: about 35 minutes on 2 CPU cores

Runs what a user runs (`sslcli data synth --hold-out-pairs --varied-captions`, `pretrain clip --recipe
small`, `zero-shot clip`, `zero-shot retrieval`), collects the results JSONs into one file for
docs/benchmarks.md, and exits with status 1, naming the failures, when a figure is not ``--margin`` above
its chance level.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SSLCLI = [sys.executable, "-m", "sslcli"]
# The class names alone, the way the varied captions name a shape ("a circle", "two circles").
TEMPLATES = "a {}\n"


def sslcli(*args: str | Path) -> float:
    start = time.perf_counter()
    subprocess.run([*SSLCLI, *map(str, args)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=None, help="default: the small recipe's")
    parser.add_argument("--size", type=int, default=None, help="training crop size; default: the small recipe's")
    parser.add_argument("--max-rotation", type=float, default=20.0, help="passed to `sslcli data synth` (upright)")
    parser.add_argument("--margin", type=float, default=0.05, help="required gain over each chance level")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/clip_zero_shot.json"))
    args = parser.parse_args()

    data, run = args.workdir / "data", args.workdir / "clip"
    if not (data / "index.json").exists():
        sslcli("data", "synth", data, "--hold-out-pairs", "--varied-captions", "--max-rotation", args.max_rotation)
    options = ["--epochs", str(args.epochs)] if args.epochs else []
    if args.size:
        view = {"count": 1, "size": args.size, "scale": [0.6, 1.0], "ratio": [1.0, 1.0], "flip": 0.5,
                "jitter_p": 0.0, "gray_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}
        options += ["--set", f"augment.views=[{json.dumps(view)}]"]
    seconds = sslcli("pretrain", "clip", "--recipe", "small", "--data", data, "--out", run, "--overwrite", *options)
    templates = args.workdir / "templates.txt"
    templates.write_text(TEMPLATES)
    results: dict[str, object] = {"pretrain_seconds": round(seconds, 1), "epochs": args.epochs, "size": args.size,
                                  "max_rotation": args.max_rotation}
    for split in ("test", "unseen"):
        out = args.workdir / f"zero-shot-{split}.json"
        extra = ["--shots", "1,2,4,8,16"] if split == "test" else []
        sslcli("zero-shot", "clip", run, data, "--labels", data / "classes.txt", "--templates", templates,
               "--split", split, "--out", out, *extra)
        results[f"zero_shot_{split}"] = json.loads(out.read_text())["metrics"]
    out = args.workdir / "retrieval.json"
    sslcli("zero-shot", "retrieval", run, data, "--split", "test", "--out", out)
    results["retrieval"] = json.loads(out.read_text())["metrics"]

    chance = 1 / 10  # ten balanced classes
    checks = {
        "zero-shot top-1, test": (results["zero_shot_test"]["top1"], chance),  # type: ignore[index]
        "zero-shot top-1, unseen pairs": (results["zero_shot_unseen"]["top1"], chance),  # type: ignore[index]
        "image->text recall@5": (results["retrieval"]["image_to_text_r5"],  # type: ignore[index]
                                 results["retrieval"]["image_to_text_chance_r5"]),  # type: ignore[index]
        "text->image recall@5": (results["retrieval"]["text_to_image_r5"],  # type: ignore[index]
                                 results["retrieval"]["text_to_image_chance_r5"]),  # type: ignore[index]
    }
    results["checks"] = {name: {"value": value, "chance": base, "passed": value > base + args.margin}
                         for name, (value, base) in checks.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for name, check in results["checks"].items():  # type: ignore[union-attr]
        print(f"{name}: {check['value']:.4f} (chance {check['chance']:.4f}) {'ok' if check['passed'] else 'FAIL'}")
    failed = [name for name, check in results["checks"].items() if not check["passed"]]  # type: ignore[union-attr]
    if failed:
        print(f"not above chance by {args.margin}: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
