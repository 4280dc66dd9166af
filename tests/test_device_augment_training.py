"""``--augment-on device``: pretraining with views made per batch by the loop's ``make_views`` hook
(sslcli/training_views.py) instead of per image in the loader workers.

The batched ops themselves are tested in tests/test_device_augment.py; here: the wiring (what the workers hand
over, seeding, bad samples, layout), a short run that trains and repeats bit for bit, resuming, and refusals.
Everything runs on the CPU, where the JPEG-bytes handover is exercised by asking for it explicitly.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sslcli.augment import MultiView
from sslcli.cli.app import app
from sslcli.config import build_config
from sslcli.data.reader import build_loader, resolve_source
from sslcli.engine import checkpoint
from sslcli.methods.base import build_method
from sslcli.pretrain import pretrain

from faults import crash_at_step
from sslcli.runs import run_encoder
from sslcli.training_views import DeviceViews, WorkerDecode, plain_jpeg, replace_bad, training_views

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")
# 64 images of 32 px, batch 16: 4 steps an epoch; ResNet-18 on SimCLR's 2 x 32-px views.
OPTIONS = {"arch": "resnet18", "epochs": 2, "batch_size": 16, "num_workers": 0, "log_every": 1,
           "augment_on": "device"}


def config(data: Path, **extra: Any):  # noqa: ANN201
    return build_config("simclr", "small", {**OPTIONS, "data": str(data), **extra})


def encoded(image: Image.Image, fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def noise(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# --- a run --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(single_thread: None, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pretrain(config(tiny_data), tmp_path_factory.mktemp("runs") / "straight", device="cpu")


def test_a_device_augmented_run_trains_and_repeats_bit_for_bit(straight: Path, tiny_data: Path,
                                                               tmp_path: Path) -> None:
    assert (straight / "encoder.safetensors").exists() and (straight / "checkpoints" / "epoch-0001.pt").exists()
    assert "augment_on: device" in (straight / "config.yaml").read_text()
    final = checkpoint.load(checkpoint.latest(straight / "checkpoints"))["model"]
    # The untrained backbone, as pretrain builds it from the seed.
    cfg = config(tiny_data)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    initial = run_encoder(cfg).state_dict()
    assert not torch.equal(final["backbone.model.conv1.weight"], initial["model.conv1.weight"])
    losses = [json.loads(line)["loss"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and all(np.isfinite(losses))

    again = pretrain(config(tiny_data), tmp_path / "again", device="cpu")
    again_final = checkpoint.load(checkpoint.latest(again / "checkpoints"))["model"]
    assert all(torch.equal(final[key], again_final[key]) for key in final)


def test_a_crashed_device_augmented_run_resumes_bit_for_bit(straight: Path, tiny_data: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    crash_at_step(monkeypatch, 7)
    run = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(config(tiny_data, checkpoint_every=5), run, device="cpu")
    assert checkpoint.latest(run / "checkpoints").name == "epoch-0001-step-000001.pt"  # resumes mid-epoch
    monkeypatch.undo()
    pretrain(config(tiny_data), run, device="cpu", resume=True)
    ours = checkpoint.load(checkpoint.latest(run / "checkpoints"))
    theirs = checkpoint.load(checkpoint.latest(straight / "checkpoints"))
    assert all(torch.equal(ours["model"][key], theirs["model"][key]) for key in theirs["model"])


# --- what the workers hand over, and the views made of it ---------------------------------------------


def device_views(data: Path, decode: WorkerDecode, *, epoch: int = 1, workers: int = 0,
                 start_batch: int = 0) -> list[list[torch.Tensor]]:
    cfg = config(data)
    loader = build_loader(resolve_source(data), decode, batch_size=16, shuffle=True, seed=3, epoch=epoch,
                          num_workers=workers, start_batch=start_batch)
    make = DeviceViews(cfg.augment, CPU, torch.contiguous_format)
    return [make(batch) for batch in loader]


def test_views_of_a_batch_depend_on_its_place_only(tiny_data: Path) -> None:
    """Not on the worker count nor on where the epoch starts (a resumed one); on the epoch they do."""
    serial = device_views(tiny_data, WorkerDecode(jpeg_bytes=False))
    assert len(serial) == 4 and [tuple(v.shape) for v in serial[0]] == [(16, 3, 32, 32)] * 2
    parallel = device_views(tiny_data, WorkerDecode(jpeg_bytes=False), workers=1)
    resumed = device_views(tiny_data, WorkerDecode(jpeg_bytes=False), start_batch=2)
    for ours, theirs in [*zip(serial, parallel), *zip(serial[2:], resumed)]:
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    other_epoch = device_views(tiny_data, WorkerDecode(jpeg_bytes=False), epoch=2)
    assert not torch.equal(serial[0][0], other_epoch[0][0])
    assert not torch.equal(serial[0][0], serial[0][1])  # two views of one batch are two draws


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
def test_plain_jpegs_cross_as_bytes_and_the_rest_as_pixels(tmp_path: Path) -> None:
    """JPEG bytes reach decode_batch (nvJPEG on a GPU); PNGs, CMYK and cut-off JPEGs are decoded in the
    worker with the default path's rules, and an undecodable file is replaced by the loader as usual."""
    folder = tmp_path / "images"
    folder.mkdir()
    files = {"a.jpg": encoded(noise(40, 30, 0), "JPEG"), "b.jpg": encoded(noise(24, 36, 1).convert("L"), "JPEG"),
             "c.png": encoded(noise(32, 32, 2), "PNG"), "d.jpg": encoded(noise(32, 28, 3).convert("CMYK"), "JPEG"),
             "e.jpg": encoded(noise(30, 30, 4), "JPEG")[:-200], "f.png": b"not an image",
             "g.jpg": encoded(noise(33, 41, 5), "JPEG") + b"\0" * 10, "h.png": encoded(noise(20, 50, 6), "PNG")}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    decode = WorkerDecode(jpeg_bytes=True)
    handed = {name: decode.decode(data) for name, data in files.items()}
    assert [name for name, x in handed.items() if x is not None and x.ndim == 1] == ["a.jpg", "b.jpg", "g.jpg"]
    assert handed["f.png"] is None and handed["e.jpg"] is None  # cut off: PIL refuses it, as on the default path
    assert handed["d.jpg"].shape == (3, 32, 28) and handed["c.png"].dtype == torch.uint8

    source = resolve_source(folder)
    as_bytes = build_loader(source, decode, batch_size=8, shuffle=True, seed=1)
    batch = next(iter(as_bytes))
    assert batch["bad_samples"] == 2  # each replaced by a good image of the batch, bytes or pixels
    assert {image.numpy().tobytes() for image in batch["images"] if image.ndim == 1} == \
        {files[name] for name in ("a.jpg", "b.jpg", "g.jpg")}
    views = DeviceViews(config(folder).augment, CPU, torch.channels_last)(batch)
    assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in views)
    # The CPU decodes a JPEG as PIL does, so handing over bytes changes no view here.
    as_pixels = next(iter(build_loader(source, WorkerDecode(jpeg_bytes=False), batch_size=8, shuffle=True, seed=1)))
    pixel_views = DeviceViews(config(folder).augment, CPU, torch.channels_last)(as_pixels)
    assert all(torch.equal(a, b) for a, b in zip(views, pixel_views))


def test_plain_jpeg_leaves_oversized_images_to_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encoded(noise(40, 40, 0), "JPEG")
    assert plain_jpeg(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # decode_rgb shrinks it while decoding; nvJPEG cannot
    assert not plain_jpeg(data)


def test_a_jpeg_the_device_cannot_decode_is_replaced_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """One bad JPEG fails nvJPEG's call for the whole batch: they are decoded one by one, the bad one replaced."""
    import sslcli.training_views as tv

    def batch_call_fails(*_: Any) -> Any:
        raise RuntimeError("nvjpeg: bad data")

    monkeypatch.setattr(tv, "decode_batch", batch_call_fails)
    good = torch.frombuffer(bytearray(encoded(noise(20, 20, 0), "JPEG")), dtype=torch.uint8)
    bad = torch.frombuffer(bytearray(b"\xff\xd8\xff" + b"\x00" * 50 + b"\xff\xd9"), dtype=torch.uint8)
    pixels = torch.zeros(3, 16, 16, dtype=torch.uint8)
    batch = {"images": [bad, good, pixels, bad], "seed": 7, "bad_samples": 1, "index": torch.tensor([0, 1, 2, 3]),
             "label": torch.tensor([5, 6, 7, 8]), "text": ["a", "b", "c", "d"]}
    images = DeviceViews(config(Path(".")).augment, CPU, torch.contiguous_format).decoded(batch)
    assert [tuple(image.shape) for image in images] == [(3, 20, 20), (3, 20, 20), (3, 16, 16), (3, 16, 16)]
    assert batch["index"].tolist() == [1, 1, 2, 2] and batch["label"].tolist() == [6, 6, 7, 7]
    assert batch["text"] == ["b", "b", "c", "c"] and batch["bad_samples"] == 3
    with pytest.raises(Exception, match="none of the 2 images"):
        replace_bad({**batch, "bad_samples": 0}, [None, None])


def test_the_default_path_is_multiview_in_the_workers(tiny_data: Path) -> None:
    cfg = build_config("simclr", "small", {"arch": "resnet18", "data": str(tiny_data)})
    method = build_method("simclr", run_encoder(cfg), cfg.method_args, num_samples=64, augment=cfg.augment)
    transform, make_views = training_views(cfg.augment_on, cfg.augment, method, CPU)
    assert cfg.augment_on == "workers" and isinstance(transform, MultiView) and make_views is None


# --- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["cmc", "--set", "method_args.extra_views={depth.png: 1}"],
         "--augment-on device cannot crop cmc's extra views (depth.png)"),
        (["simclr", "--augment-on", "gpu"], "config key 'augment_on' must be one of ['workers', 'device']"),
    ],
)
def test_what_the_device_path_cannot_make_is_one_line_exit_2(args: list[str], needle: str, tiny_data: Path,
                                                               tmp_path: Path) -> None:
    device_path = [] if "--augment-on" in args else ["--augment-on", "device"]
    result = CliRunner().invoke(app, ["pretrain", *args, *device_path, "--recipe", "small", "--batch-size", "16",
                                      "--device", "cpu", "--data", str(tiny_data), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and needle in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything was written
