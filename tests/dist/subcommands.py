"""Runs the subcommands that issue 8 brought under torchrun through the CLI app, in-process, on every rank;
each rank records every file it opens for writing, creates, renames or replaces under WORK.

Arguments: WORK TAG [--single-device]. WORK holds what tests/test_distributed_subcommands.py prepared (data,
vit.safetensors, clip/, mae/, folder/). Every launch runs `finetune` + `distill` (outputs WORK/TAG-ft,
WORK/TAG-distill) and `zero-shot clip` + `zero-shot retrieval` (WORK/TAG-zs.json, WORK/TAG-ret.json);
with --single-device also the single-device commands (data synth / info / subset / shards, export, attention,
reconstruct, plot, report; outputs under WORK/TAG-single). Each rank then writes the paths it wrote to
WORK/writes-TAG-rank<r>.json.

The fine-tune's random-resized-crop-and-flip is replaced by the deterministic evaluation transform: the loader
seeds augmentation per (rank, batch, slot), so 2 ranks x B/2 draw other crops than 1 rank x B, and the
weights could not be compared.
"""

import json
import os
import sys
from pathlib import Path

from eval_commands import track_writes  # the same write tracking as the knn / linear-probe / embed check

import sslcli.evaluation.finetune
from sslcli.augment import eval_transform
from sslcli.cli.app import app

CPU = ["--device", "cpu"]


def _training(work: Path, tag: str) -> list[list[str]]:
    data, ft = str(work / "data"), str(work / f"{tag}-ft")
    steps = ["--batch-size", "8", "--optimizer", "sgd", "--lr", "2.0", *CPU]
    return [
        ["finetune", str(work / "vit.safetensors"), "--data", data, "--out", ft, "--epochs", "2", "--eval-every", "1",
         "--val-fraction", "0.25", *steps],
        ["distill", ft, "--data", data, "--init", str(work / "vit.safetensors"), "--out", str(work / f"{tag}-distill"),
         "--epochs", "1", "--temperature", "2", *steps],
    ]


def _zero_shot(work: Path, tag: str) -> list[list[str]]:
    # Batch size 1: each image's forward pass is then the same in any share, so the results are bit-identical.
    data, run = str(work / "data"), str(work / "clip")
    return [
        ["zero-shot", "clip", run, data, "--labels", str(work / "data" / "classes.txt"), "--shots", "1,2", "--seeds",
         "2", "--out", str(work / f"{tag}-zs.json"), "--batch-size", "1", *CPU],
        ["zero-shot", "retrieval", run, data, "--limit", "7", "--out", str(work / f"{tag}-ret.json"), "--batch-size",
         "1", *CPU],
    ]


def _single_device(work: Path, tag: str) -> list[list[str]]:
    out, data, mae = work / f"{tag}-single", str(work / "data"), str(work / "mae")
    return [
        ["data", "synth", str(out / "synth"), "--train", "12", "--test", "4", "--size", "16", "--shard-size", "8"],
        ["data", "info", str(out / "synth")],
        ["data", "subset", str(out / "synth"), str(out / "subset"), "--fraction", "0.5"],
        ["data", "shards", str(work / "folder"), str(out / "shards")],
        ["export", mae, "--out", str(out / "mae.safetensors")],
        ["attention", str(out / "mae.safetensors"), data, "--limit", "2", "--out", str(out / "attention"), *CPU],
        ["reconstruct", mae, data, "--limit", "2", "--out", str(out / "reconstruct"), *CPU],
        ["plot", mae, "--out", str(out / "training.png")],
        ["report", str(out / "reconstruct" / "reconstruct.json"), "--metric", "loss", "--markdown",
         str(out / "report.md")],
    ]


def main(work: Path, tag: str, single_device: bool) -> None:
    work = work.resolve()
    sslcli.evaluation.finetune.view_transform = lambda view, mean, std: eval_transform(view.size, 1.0, mean, std)
    written: list[str] = []
    undo = track_writes(work, written)
    commands = _training(work, tag) + _zero_shot(work, tag) + (_single_device(work, tag) if single_device else [])
    try:
        for args in commands:
            code = app(args, standalone_mode=False)
            if code not in (None, 0):
                raise SystemExit(f"`sslcli {' '.join(args)}` exited with {code}")
    finally:
        undo()
    rank = int(os.environ.get("RANK", 0))
    (work / f"writes-{tag}-rank{rank}.json").write_text(json.dumps(written))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], "--single-device" in sys.argv[3:])
