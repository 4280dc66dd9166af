"""Runs `sslcli knn`, `sslcli linear-probe --protocol fast` and `sslcli embed` through the CLI app, in-process,
on every rank; each rank records every file it opens for writing, creates, renames or replaces under ROOT.

Arguments: DATA ROOT TAG. Results go to ROOT/TAG-<command>.json; each rank then writes the paths it wrote
(before this report) to ROOT/writes-TAG-rank<r>.json. Launched by torchrun (2 gloo ranks) from
tests/test_distributed_eval.py.
"""

import builtins
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from sslcli import distributed as dist
from sslcli.cli.app import app

ENCODER = ["--random-init", "--arch", "resnet18", "--image-size", "32", "--crop-pct", "1.0", "--device", "cpu",
           "--batch-size", "1"]


def track_writes(root: Path, written: list[str]) -> Callable[[], None]:
    """Wraps the calls a write goes through (safetensors' own writer still ends in os.replace); returns an undo."""
    real = {"open": builtins.open, "os_open": os.open, "replace": os.replace, "rename": os.rename, "mkdir": os.mkdir}

    def note(path: object) -> None:
        if isinstance(path, (str, os.PathLike)) and Path(os.fspath(path)).resolve().is_relative_to(root):
            written.append(str(path))

    def opening(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if any(flag in mode for flag in "wax+"):
            note(file)
        return real["open"](file, mode, *args, **kwargs)

    def os_opening(path, flags, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            note(path)
        return real["os_open"](path, flags, *args, **kwargs)

    def moving(name: str) -> Callable[..., None]:
        def move(src, dst, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            note(dst)
            return real[name](src, dst, *args, **kwargs)
        return move

    def making(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        note(path)
        return real["mkdir"](path, *args, **kwargs)

    builtins.open = io.open = opening
    os.open, os.replace, os.rename, os.mkdir = os_opening, moving("replace"), moving("rename"), making

    def undo() -> None:
        builtins.open = io.open = real["open"]
        os.open, os.replace, os.rename, os.mkdir = real["os_open"], real["replace"], real["rename"], real["mkdir"]

    return undo


def main(data: str, root: Path, tag: str) -> None:
    root = root.resolve()
    rank = int(os.environ.get("RANK", 0))
    written: list[str] = []
    undo = track_writes(root, written)
    commands = [
        ["knn", *ENCODER, "--data", data, "--k", "5", "--k", "20", "--out", str(root / f"{tag}-knn.json")],
        ["linear-probe", *ENCODER, "--data", data, "--protocol", "fast", "--out", str(root / f"{tag}-probe.json")],
        ["embed", *ENCODER, "--data", data, "--out", str(root / f"{tag}-embed.safetensors"),
         "--results", str(root / f"{tag}-embed.json")],
    ]
    try:
        for args in commands:
            app(args, standalone_mode=False)
    finally:
        undo()
    dist.barrier()
    (root / f"writes-{tag}-rank{rank}.json").write_text(json.dumps(written))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
