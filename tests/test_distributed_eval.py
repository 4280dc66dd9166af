"""Evaluation under torchrun: ranks share feature extraction and give one process's metrics; rank 0 alone writes
(finetune, distill, zero-shot and the single-device commands: tests/test_distributed_subcommands.py).
Plus the SLURM recipes, which must parse and use only options that exist."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from safetensors.torch import load_file
from torch.distributed.run import get_args_parser

import sslcli.distributed
from sslcli.cli.app import app
from sslcli.data.reader import resolve_source
from sslcli.data.synth import generate_synthetic
from sslcli.evaluation.features import rank_loaders

SCRIPT = Path(__file__).parent / "dist" / "eval_commands.py"
RECIPES = Path(__file__).parents[1] / "recipes" / "slurm"


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """201 train + 101 test images of 32 px: odd counts, so two ranks cannot split them evenly."""
    out = tmp_path_factory.mktemp("odd-synth") / "shapes"
    generate_synthetic(out, train=201, test=101, size=32, seed=0, shard_size=64)
    return out


def _launch(data: Path, root: Path, tag: str, nproc: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SSLCLI_CACHE": str(root / f"cache-{tag}"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.Popen([*launcher, str(SCRIPT), str(data), str(root), tag], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_ranks_give_one_process_metrics_and_only_rank0_writes(odd_data: Path, tmp_path: Path) -> None:
    # Both launches at once: the machine has two cores and each run is mostly start-up.
    runs = {"one": _launch(odd_data, tmp_path, "one", 1), "two": _launch(odd_data, tmp_path, "two", 2)}
    for tag, proc in runs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{tag}:\n{output[-4000:]}"
    for command in ("knn", "probe", "embed"):
        one, two = (json.loads((tmp_path / f"{tag}-{command}.json").read_text()) for tag in ("one", "two"))
        assert one["metrics"] == two["metrics"], command
        assert (one["params"]["world_size"], two["params"]["world_size"]) == (1, 2)
    one, two = (load_file(tmp_path / f"{tag}-embed.safetensors") for tag in ("one", "two"))
    assert torch.equal(one["labels"], two["labels"]) and one["labels"].shape == (101,)
    assert torch.equal(one["features"], two["features"])  # batch size 1: each image's forward pass is the same
    # The two-rank run extracted (the cache was empty) and stored both splits, through rank 0 only.
    assert len(list((tmp_path / "cache-two" / "features").glob("*.safetensors"))) == 2
    rank0, rank1 = (json.loads((tmp_path / f"writes-two-rank{r}.json").read_text()) for r in (0, 1))
    assert any(path.endswith("two-knn.json") for path in rank0) and any("cache-two" in path for path in rank0)
    assert rank1 == []


@pytest.mark.parametrize("world", [2, 3, 4])
def test_rank_shares_hold_every_sample_once(odd_data: Path, world: int, monkeypatch: pytest.MonkeyPatch) -> None:
    source = resolve_source(odd_data, "test")  # 101 samples: 101 % world != 0 for every world here

    def to_tensor(image) -> torch.Tensor:  # noqa: ANN001
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)

    seen: list[int] = []
    for rank in range(world):
        monkeypatch.setattr(sslcli.distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(sslcli.distributed, "world_size", lambda: world)
        share = [int(i) for loader in rank_loaders(source, to_tensor, batch_size=16, num_workers=0)
                 for batch in loader for i in batch["index"]]
        assert source.num_samples // world <= len(share) <= source.num_samples // world + 1
        seen += share
    assert sorted(seen) == list(range(source.num_samples))


def _commands(script: Path) -> list[str]:
    """The script's lines with continuations joined, comments and #SBATCH lines dropped."""
    text = re.sub(r"\\\n\s*", " ", script.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", text))


@pytest.mark.parametrize("script", ["single_node.sbatch", "multi_node.sbatch"])
def test_slurm_recipe_parses_and_uses_only_real_options(script: str) -> None:
    path = RECIPES / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert re.search(r"^#SBATCH --signal=(B:)?USR1@\d+$", text, re.M)
    torchrun_options = set(get_args_parser()._option_string_actions)
    root = typer.main.get_command(app)
    sslcli_options = {name: {opt for param in command.params for opt in param.opts}
                      for name, command in root.commands.items()}  # type: ignore[attr-defined]
    used: dict[str, set[str]] = {}
    for line in _commands(path):
        if "torchrun" in line:
            launcher = line.split("torchrun", 1)[1].split(" -m sslcli", 1)[0]
            assert _options(launcher) <= torchrun_options, _options(launcher) - torchrun_options
        match = re.search(r"(?:-m sslcli|launch) (pretrain|knn)\b(.*?)(?:&|$)", line)
        if match:
            used.setdefault(match.group(1), set()).update(_options(match.group(2)))
    assert "--resume" in used["pretrain"] and "auto" in text
    for command, options in used.items():
        assert options <= sslcli_options[command], (command, options - sslcli_options[command])
    if script == "multi_node.sbatch":
        assert "--rdzv_backend=c10d" in text and "scontrol show hostnames" in text and "--nnodes=" in text
    else:
        assert "--standalone" in text
