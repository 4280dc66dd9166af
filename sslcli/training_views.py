"""Where a pretraining run's augmented views are made: ``--augment-on workers|device`` (``augment_on``).

``workers`` (the default): :class:`sslcli.augment.MultiView` augments each image in the DataLoader
workers, and the loop moves the collated ``batch["views"]`` to the device.

``device`` (issue 10): the workers only decode, and the loop's ``make_views`` hook (:class:`DeviceViews`)
augments each whole batch where training runs, with :class:`sslcli.device_augment.BatchedViews`.
What the workers hand over (:class:`WorkerDecode`):

- training on a GPU, a JPEG that nvJPEG can take as it is (RGB or grey, within PIL's pixel limit, ending
  in its end-of-image marker; the worker reads its header, not its pixels) crosses to the main process as
  its bytes, and :func:`~sslcli.device_augment.decode_batch` decodes the batch's JPEGs on the GPU in one
  call.  Every other image (PNG, CMYK or oversized JPEG, anything doubtful) is decoded in the worker by
  :func:`sslcli.data.formats.decode_rgb`, with the default path's rules (alpha onto white, 16-bit greys,
  undecodable = a bad sample), and crosses as uint8 ``[3, H, W]`` pixels;
- training on the CPU, every image is decoded in the workers: the main process would decode serially
  what the workers decode in parallel, so only the augmentation moves, to one batched pass.

Bad samples stay the loader's business: an image that fails to decode in a worker is replaced there by a
good one of its batch.  A JPEG whose header passed but whose data nvJPEG rejects fails the batch's one
decode call; the batch's JPEGs are then decoded one by one on the CPU, and those that still fail are
replaced by a good image of the batch (the loader's rule: the nearest before, else the first after) and
counted in ``batch["bad_samples"]``.

Each batch draws from a generator seeded with the loader's ``batch["seed"]`` (from the run seed, epoch,
rank and batch index, :class:`sslcli.data.loader.DecodeOnly`), so the views do not depend on the worker
count nor on resuming mid-epoch.  They are not the workers' views: another generator, and float32 from
the decoded pixels on instead of MultiView's 8-bit PIL ops; the same distribution (docs/benchmarks.md).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image

from sslcli.augment import AugmentConfig, MultiView
from sslcli.data.formats import decode_rgb
from sslcli.data.loader import stand_ins
from sslcli.device_augment import BatchedViews, decode_batch
from sslcli.engine.device import memory_format_for
from sslcli.errors import UserError

if TYPE_CHECKING:
    from sslcli.data.loader import DecodeOnly, Transform
    from sslcli.methods.base import Method

logger = logging.getLogger(__name__)

AugmentOn = Literal["workers", "device"]
ViewMaker = Callable[[dict[str, Any]], list[torch.Tensor]]
_JPEG_START, _JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
_TAIL = 1024  # bytes searched for the end-of-image marker: encoders may pad a JPEG with zeros
_NVJPEG_MODES = ("RGB", "L")  # CMYK and YCCK JPEGs are converted by PIL in the worker instead


def plain_jpeg(data: bytes) -> bool:
    """Whether ``data`` is a JPEG that nvJPEG can decode as PIL would: RGB or grey, within PIL's
    ``MAX_IMAGE_PIXELS`` (a larger one is shrunk while decoding by :func:`decode_rgb`), and not cut short.
    Only the header is parsed; a JPEG corrupt inside is caught by :class:`DeviceViews`."""
    if not data.startswith(_JPEG_START) or not data[-_TAIL:].rstrip(b"\0").endswith(_JPEG_END):
        return False
    try:
        with warnings.catch_warnings():  # PIL warns about large images, which are checked here
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:  # reads the markers up to the first scan, no pixels
                width, height = image.size
                limit = Image.MAX_IMAGE_PIXELS
                return image.format == "JPEG" and image.mode in _NVJPEG_MODES and \
                    (limit is None or width * height <= limit)
    except Exception:  # noqa: BLE001 - any failure to parse the header means "decode it in the worker"
        return False


def rgb_pixels(data: bytes) -> torch.Tensor | None:
    """``data`` decoded by :func:`decode_rgb` as uint8 ``[3, H, W]``; None when it is not a readable image."""
    image = decode_rgb(data)
    return None if image is None else torch.from_numpy(np.array(image)).permute(2, 0, 1)


class WorkerDecode:
    """The loader's transform for ``--augment-on device`` (a :class:`~sslcli.data.loader.DecodeOnly`): each image's
    bytes -> its JPEG bytes as a 1-D uint8 tensor (``jpeg_bytes`` and :func:`plain_jpeg`) or its uint8 pixels."""

    def __init__(self, jpeg_bytes: bool) -> None:
        self.jpeg_bytes = jpeg_bytes

    def decode(self, data: bytes) -> torch.Tensor | None:
        if self.jpeg_bytes and plain_jpeg(data):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # frombuffer warns on read-only bytes
        return rgb_pixels(data)


class DeviceViews:
    """The loop's ``make_views`` for ``--augment-on device``: a batch's ``images`` (from :class:`WorkerDecode`)
    -> :class:`~sslcli.augment.MultiView`'s views, augmented as one batch on ``device``, in ``layout``."""

    def __init__(self, cfg: AugmentConfig, device: torch.device, layout: torch.memory_format) -> None:
        self.augment = BatchedViews(cfg)
        self.device = device
        self.layout = layout
        self.generator = torch.Generator(device=device)  # reseeded per batch: no state to checkpoint

    def __call__(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        images = self.decoded(batch)
        self.generator.manual_seed(batch["seed"])
        return [view.contiguous(memory_format=self.layout) for view in self.augment(images, self.generator)]

    def decoded(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """The batch's images as uint8 ``[3, H_i, W_i]`` on the device: JPEG bytes decoded, pixels copied."""
        images: list[torch.Tensor] = batch["images"]
        out: list[torch.Tensor | None] = [image.to(self.device, non_blocking=True) if image.ndim == 3 else None
                                          for image in images]
        jpegs = [i for i, image in enumerate(images) if image.ndim == 1]
        if not jpegs:
            return out  # type: ignore[return-value]
        try:
            decoded: list[torch.Tensor | None] = list(decode_batch([images[i] for i in jpegs], self.device))
        except RuntimeError:  # one bad JPEG fails the whole call: find it by decoding them one by one
            decoded = [rgb_pixels(images[i].numpy().tobytes()) for i in jpegs]
            decoded = [None if image is None else image.to(self.device) for image in decoded]
        for i, image in zip(jpegs, decoded):
            out[i] = image
        return replace_bad(batch, out)


def replace_bad(batch: dict[str, Any], images: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """``images`` with each None replaced as the loader replaces a bad sample (the nearest good one before it,
    else the first after; its label, index and caption too), counted in ``batch["bad_samples"]``."""
    missing = [image is None for image in images]
    if not any(missing):
        return images  # type: ignore[return-value]
    if all(missing):
        raise UserError(f"none of the {len(images)} images of a batch decode; check the data")
    replaced = stand_ins(missing)
    for slot, donor in replaced.items():
        images[slot] = images[donor]
        batch["label"][slot], batch["index"][slot] = batch["label"][donor], batch["index"][donor]
        batch["text"][slot] = batch["text"][donor]
    batch["bad_samples"] += len(replaced)
    logger.warning("%d image(s) of a batch did not decode on %s; each replaced by a good one of its batch",
                   len(replaced), images[missing.index(False)].device)
    return images  # type: ignore[return-value]


def training_views(augment_on: AugmentOn, augment: AugmentConfig, method: Method,
                   device: torch.device) -> tuple[Transform | DecodeOnly, ViewMaker | None]:
    """The loader's transform and the loop's ``make_views`` hook (None: move ``batch["views"]``) for a run
    of ``method`` on ``device``; refuses what the device path cannot make before anything is written."""
    extra = method.extra_fields()
    if augment_on == "workers":
        return MultiView(augment, extra), None
    if augment_on != "device":
        raise ValueError(f"augment_on must be 'workers' or 'device', not {augment_on!r}")
    if extra:
        raise UserError(f"--augment-on device cannot crop {method.name}'s extra views ({', '.join(extra)}) with the "
                        "image; use --augment-on workers, or drop them: --set 'method_args.extra_views={}'")
    return WorkerDecode(jpeg_bytes=device.type == "cuda"), DeviceViews(augment, device,
                                                                        memory_format_for(method, device))
