"""The loader's split modes (by sample, by shard, resampled) and resuming an epoch at ``start_batch``."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_launch import torchrun
from shard_corpus import noisy, to_tensor, write_shards

import sslcli.data.streams as streams
from sslcli.data import StreamOptions, build_loader, resolve_source
from sslcli.data.reader import DataSource
from sslcli.errors import UserError

SIZES = [30, 12, 25, 7, 18, 22, 9, 27]  # 150 samples in 8 shards of unequal sizes


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> DataSource:
    return resolve_source(write_shards(tmp_path_factory.mktemp("uneven"), SIZES))


def epoch(loader: Any) -> list[dict[str, Any]]:
    return list(loader)


def flat_indices(batches: list[dict[str, Any]]) -> list[int]:
    return [i for batch in batches for i in batch["index"].tolist()]


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The shard paths the loader opens, in order (in this process: num_workers=0)."""
    paths: list[str] = []
    real = streams.iter_tar_samples

    def counting(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
        paths.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(streams, "iter_tar_samples", counting)
    return paths


MODES = {"sample": StreamOptions(split_by="sample"), "shard": StreamOptions(split_by="shard", shuffle_buffer=16),
         "resampled": StreamOptions(resampled=True, epoch_samples=100, shuffle_buffer=16)}


@pytest.mark.parametrize("mode", list(MODES))
def test_start_batch_gives_the_rest_of_the_epoch_bit_identical(uneven: DataSource, mode: str) -> None:
    for rank in range(2):
        kwargs = dict(batch_size=8, shuffle=True, seed=3, epoch=1, rank=rank, world_size=2, options=MODES[mode])
        whole = build_loader(uneven, noisy, **kwargs)
        assert whole.mode == mode
        full = epoch(whole)
        assert len(full) == len(whole) == (100 if mode == "resampled" else 150) // 2 // 8
        torch.manual_seed(123)  # the caller's generator must neither matter nor move
        before = torch.get_rng_state()
        for start in (1, 4, len(full)):
            resumed = build_loader(uneven, noisy, start_batch=start, **kwargs)
            rest = epoch(resumed)
            assert len(resumed) == len(rest) == len(full) - start
            for a, b in zip(full[start:], rest):
                assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])
        assert torch.equal(torch.get_rng_state(), before)


def test_start_batch_with_workers_matches_in_process(uneven: DataSource) -> None:
    kwargs = dict(batch_size=5, shuffle=True, seed=1, rank=1, world_size=2, options=MODES["shard"])
    full = epoch(build_loader(uneven, noisy, num_workers=2, **kwargs))
    rest = epoch(build_loader(uneven, noisy, num_workers=2, start_batch=3, **kwargs))
    assert len(full) == 15 and len(rest) == 12
    for a, b in zip(full[3:], rest):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])
    # Per-sample augmentation seeds: the sample mode's batches do not depend on the worker count at all.
    sample_kwargs = {**kwargs, "options": MODES["sample"]}
    serial = epoch(build_loader(uneven, noisy, **sample_kwargs))
    parallel = epoch(build_loader(uneven, noisy, num_workers=2, start_batch=2, **sample_kwargs))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(serial[2:], parallel))


def test_start_batch_out_of_range_is_a_user_error(uneven: DataSource) -> None:
    with pytest.raises(UserError, match="cannot resume at batch 20 of an epoch of 18"):
        build_loader(uneven, to_tensor, batch_size=8, shuffle=True, start_batch=20)


def test_auto_mode_keeps_few_shards_in_the_global_stream(uneven: DataSource, synth_data: Path) -> None:
    demo = resolve_source(synth_data)  # 3 shards, like the embedded dataset's 5
    for workers, world in [(0, 1), (2, 1), (0, 2), (1, 2)]:
        assert build_loader(demo, to_tensor, batch_size=4, shuffle=True, num_workers=workers, world_size=world,
                            rank=0).mode == "sample"
    assert build_loader(uneven, to_tensor, batch_size=4, shuffle=True, world_size=2, rank=0).mode == "shard"  # 8 >= 4x2
    assert build_loader(uneven, to_tensor, batch_size=4, shuffle=True, world_size=3, rank=0).mode == "sample"
    assert build_loader(uneven, to_tensor, batch_size=4, shuffle=False, world_size=2, rank=0).mode == "sample"


def test_shard_mode_reads_only_own_shards_and_repeats_nothing(tmp_path: Path, opened: list[str]) -> None:
    source = resolve_source(write_shards(tmp_path / "d", [20] * 8))  # each consumer's two shards fill its quota
    seen: list[list[int]] = []
    shards_read: list[set[str]] = []
    # A rank's epoch: 80 samples in 20 batches of 4; the buffer exceeds the data, so every own shard is read.
    plan = streams.Plan(source, "shard", seed=9, shuffle=True, shuffle_buffer=1000, batch_size=4, quota=80,
                        batches=20, extra_fields={})
    for rank in range(2):
        for role in range(2):  # a rank with two workers, each consumer simulated in this process
            opened.clear()
            records = [r for _, batch in plan.groups(rank, 2, role, 2, 0) for r in batch]
            seen.append([r.index for r in records])
            shards_read.append(set(opened))
    # 8 shards dealt to 4 consumers: two each, disjoint, together all of them.
    assert [len(s) for s in shards_read] == [2, 2, 2, 2]
    assert set().union(*shards_read) == {f"train-{i:06d}.tar" for i in range(8)}
    assert sum(len(s) for s in shards_read) == 8
    # Without wrap-around no sample repeats within the epoch, and the rank-level batch counts match.
    counts = Counter(i for indices in seen for i in indices)
    assert max(counts.values()) == 1 and sum(counts.values()) == 160


def test_shard_mode_wraps_around_when_a_consumer_runs_short(tmp_path: Path, opened: list[str]) -> None:
    source = resolve_source(write_shards(tmp_path / "d", [40, 3, 2, 3, 2, 40, 1, 1]))  # 92 samples
    options = StreamOptions(split_by="shard", shuffle_buffer=8)
    per_rank = []
    for rank in range(2):
        opened.clear()
        loader = build_loader(source, to_tensor, batch_size=5, shuffle=True, seed=0, rank=rank, world_size=2,
                              options=options)
        batches = epoch(loader)
        assert len(batches) == len(loader) == 92 // 2 // 5
        assert all(len(batch["index"]) == 5 for batch in batches)
        per_rank.append((flat_indices(batches), list(opened)))
    # One rank's dealt shards hold fewer than its 45 samples: it goes on into further shards (repeats allowed).
    short = [indices for indices, names in per_rank if len(set(names)) > 4]
    assert short, "a rank with short shards should have read beyond its own four"


def test_resampled_epochs_are_exact_seeded_and_differ(uneven: DataSource, opened: list[str]) -> None:
    options = StreamOptions(resampled=True, epoch_samples=64, shuffle_buffer=8)
    draws = []
    for seed, epoch_number in [(0, 0), (0, 0), (0, 1), (1, 0)]:
        opened.clear()
        loader = build_loader(uneven, to_tensor, batch_size=6, shuffle=True, seed=seed, epoch=epoch_number,
                              rank=0, world_size=2, options=options)
        batches = epoch(loader)
        assert len(loader) == len(batches) == 64 // 2 // 6 and all(len(b["index"]) == 6 for b in batches)
        draws.append((list(opened), flat_indices(batches)))
    assert draws[0] == draws[1]  # deterministic per (seed, epoch)
    assert draws[2][0] != draws[0][0] and draws[3][0] != draws[0][0]  # another shard draw per epoch and seed
    # A one-shard dataset resampled still fills any epoch length.
    single = resolve_source(uneven.urls[3])  # 7 samples
    loader = build_loader(single, to_tensor, batch_size=4, shuffle=True, options=StreamOptions(resampled=True,
                          epoch_samples=40))
    assert len(epoch(loader)) == 10


def test_mode_options_are_checked(uneven: DataSource, tmp_path: Path) -> None:
    from shard_corpus import png

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(png((i, 0, 0)))
    cases = [
        (resolve_source(folder), StreamOptions(split_by="shard"), "needs a shard dataset"),
        (resolve_source(folder), StreamOptions(resampled=True), "needs a shard dataset"),
        (uneven, StreamOptions(resampled=True, split_by="sample"), "contradicts"),
        (uneven, StreamOptions(split_by="rank"), "must be one of auto, shard, sample"),
        (uneven, StreamOptions(shuffle_buffer=0), r"--shuffle-buffer \(loader.shuffle_buffer\) must be at least 1"),
        (uneven, StreamOptions(prefetch=0), "--prefetch .* at least 1"),
        (uneven, StreamOptions(resampled=True, epoch_samples=0), "--epoch-samples .* at least 1"),
        (uneven, StreamOptions(epoch_samples=10), "add --resampled"),
    ]
    for source, options, message in cases:
        with pytest.raises(UserError, match=message):
            build_loader(source, to_tensor, batch_size=1, shuffle=True, options=options)


def test_uneven_shards_on_two_real_ranks_give_equal_batch_counts(tmp_path: Path) -> None:
    data = write_shards(tmp_path / "d", [40, 6, 25, 3, 14])  # 88 samples, 44 per rank, 11 batches of 4
    torchrun("uneven_shards.py", str(data), str(tmp_path), "0")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["mode"] == "shard"
        assert result["len"] == result["steps"] == 11 and len(result["indices"]) == 44
    # The five shards are dealt 3 and 2: the ranks start on disjoint shards, and the short one wraps around.
    first = [result["opened"][:2] for result in ranks]
    assert not set(first[0]) & set(first[1])
    assert max(len(result["opened"]) for result in ranks) > 2


def test_cli_options_reach_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sslcli.pretrain
    from typer.testing import CliRunner

    from sslcli.cli.app import app

    seen: list[Any] = []
    monkeypatch.setattr(sslcli.pretrain, "pretrain", lambda cfg, *args, **kwargs: seen.append(cfg.loader))
    base = ["pretrain", "simclr", "--recipe", "small", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, [*base, "--split-by", "shard", "--resampled", "--epoch-samples", "500",
                                      "--shuffle-buffer", "64", "--prefetch", "4"])
    assert result.exit_code == 0, result.output
    assert seen == [StreamOptions(split_by="shard", resampled=True, epoch_samples=500, shuffle_buffer=64, prefetch=4)]
    result = CliRunner().invoke(app, [*base, "--split-by", "rank"])
    assert result.exit_code == 2 and "loader.split_by" in result.output and "Traceback" not in result.output
