"""SimCLR v2's semi-supervised pipeline on the embedded data, measured end to end with the real CLI.

    python -m benchmarks.semi_supervised --workdir /tmp/semi [--fractions 0.01 0.1]

For each label fraction: a class-balanced subset (`sslcli data subset`), a teacher fine-tuned on it from
the SimCLR v2 run with the projector's first layer kept (`finetune --keep-proj-layers 1`), and a student
distilled from that teacher on the whole (unlabelled) train split (`distill --init RUN`).  Reports top-1 /
top-5 of teacher and student on the test split, plus the pretrained encoder's kNN top-1 for context; the
table goes into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.demo_accuracy import run


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.01, 0.1])
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--student-epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/semi_supervised.json"))
    args = parser.parse_args()
    work, data = args.workdir, args.workdir / "data"
    if not (data / "index.json").exists():
        run("data", "synth", str(data))
    pretrained = work / "simclrv2"
    pretrain_s = 0.0
    if not (pretrained / "encoder.safetensors").exists():
        pretrain_s = run("pretrain", "simclrv2", "--recipe", "small", "--data", str(data), "--out", str(pretrained),
                         "--overwrite")
    run("knn", str(pretrained), "--data", str(data), "--out", str(work / "knn.json"))
    rows: list[dict] = [{"stage": "pretrained encoder, kNN (k=20)", "fraction": 1.0, "seconds": round(pretrain_s, 1),
                         **_metrics(work / "knn.json")}]
    for fraction in args.fractions:
        tag = f"{fraction:g}"
        subset, teacher, student = work / f"data-{tag}", work / f"teacher-{tag}", work / f"student-{tag}"
        run("data", "subset", str(data), str(subset), "--fraction", str(fraction), "--overwrite")
        teacher_s = run("finetune", str(pretrained), "--data", str(subset), "--keep-proj-layers", "1",
                        "--min-scale", "0.5", "--epochs", str(args.teacher_epochs), "--out", str(teacher), "--overwrite")
        # The student reads the full train split's images only; the teacher's soft labels replace labels.
        student_s = run("distill", str(teacher), "--data", str(data), "--init", str(pretrained), "--min-scale", "0.5",
                        "--epochs", str(args.student_epochs), "--out", str(student), "--overwrite")
        rows.append({"stage": f"teacher: finetune on {fraction:.0%} labels", "fraction": fraction,
                     "seconds": round(teacher_s, 1), **_metrics(teacher / "results.json")})
        rows.append({"stage": f"student: distill from the {fraction:.0%} teacher", "fraction": fraction,
                     "seconds": round(student_s, 1), **_metrics(student / "results.json")})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print("| stage | time (s) | top-1 | top-5 |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['seconds']} | {r['top1']:.1%} | {r['top5']:.1%} |")


if __name__ == "__main__":
    main()
