"""Shared fixtures: a small generated dataset that tests across the package can train and evaluate on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sslcli.config import build_config
from sslcli.data.synth import generate_synthetic
from sslcli.pretrain import pretrain


@pytest.fixture(scope="session", autouse=True)
def _feature_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Evaluations cache features outside run directories in $SSLCLI_CACHE: a temporary one, not ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSLCLI_CACHE", str(tmp_path_factory.mktemp("sslcli-cache")))
        yield


@pytest.fixture(autouse=True)
def _default_log_settings() -> Iterator[None]:
    """A CLI call's --quiet / --log-format / --tensorboard stay set in the process: reset them per test."""
    from sslcli.engine.metrics import configure

    yield
    configure()


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated dataset directory: 600 train + 300 test images of 32 px in 200-sample shards."""
    out = tmp_path_factory.mktemp("synth") / "shapes"
    generate_synthetic(out, train=600, test=300, size=32, seed=0, shard_size=200)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smaller one for short training runs: 64 train + 16 test images of 32 px in 32-sample shards."""
    out = tmp_path_factory.mktemp("tiny") / "shapes"
    generate_synthetic(out, train=64, test=16, size=32, seed=0, shard_size=32)
    return out


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for a module's tests: tiny tensors only pay OpenMP spin-waits for more on a busy
    machine, and a subprocess run with OMP_NUM_THREADS=1 then sums floats in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer_run(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dVAE tokenizer run, trained for one epoch on ``synth_data``: beit's prerequisite (its stage 1)."""
    cfg = build_config("dvae", "small", {"epochs": 1, "batch_size": 64, "num_workers": 0, "data": str(synth_data)})
    return pretrain(cfg, tmp_path_factory.mktemp("dvae") / "run", device="cpu")
