"""Shared pieces of the on-disk format: names, tar reading and image-folder scanning.

Both the writers (:mod:`sslcli.data.shards`, :mod:`sslcli.data.synth`) and the readers
(:mod:`sslcli.data.reader`, :mod:`sslcli.data.loader`) use these, so the rules for what
counts as a sample live in exactly one place.
"""

from __future__ import annotations

import io
import os
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from sslcli.errors import UserError

INDEX_NAME = "index.json"
FORMAT = "sslcli-shards/1"
SPLIT_NAMES = ("train", "test", "val")
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm"})

# One tar "record" is 20 blocks; the zero padding after the end-of-archive marker never
# exceeds it, so a longer non-zero tail means the archive is damaged, not merely padded.
_TAIL_CHECK_BYTES = 1 << 20
# Every complete tar ends with two zero blocks; their absence means the file was cut short.
_END_MARKER_BYTES = 2 * tarfile.BLOCKSIZE


def split_member_name(name: str) -> tuple[str, str]:
    """Splits a tar member name into (key, extension) the way WebDataset does.

    The key is everything up to the first dot of the base name, so ``a/b.seg.png`` has key
    ``a/b`` and extension ``seg.png``; a name without a dot has an empty extension.
    """
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def image_field(sample: dict[str, bytes]) -> str | None:
    """The name of the sample's image field, or None when it has no image."""
    for field in sample:
        if field in IMAGE_EXTENSIONS:
            return field
    return None


def _damaged(path: Path, err: BaseException | str) -> UserError:
    """The one error for any shard that tarfile cannot read to the end."""
    return UserError(f"shard '{path}' is truncated or not a valid tar file ({err}); regenerate or remove it")


def _check_readable(path: Path) -> None:
    """Clear messages for the two cases tarfile reports confusingly: missing and empty."""
    if not path.is_file():
        raise UserError(f"shard '{path}' does not exist; regenerate the dataset or fix the path")
    if path.stat().st_size == 0:
        raise UserError(f"shard '{path}' is empty (0 bytes); regenerate or remove it")


def _check_tail(handle: tarfile.TarFile, path: Path) -> None:
    """Fails unless the last member is followed by the end-of-archive marker and padding.

    tarfile stops silently at a damaged or missing header after the first one, which would
    make a cut-off or half-overwritten shard look like a short but valid one.
    """
    fileobj = handle.fileobj
    assert fileobj is not None
    size = path.stat().st_size
    if handle.offset > size:
        raise _damaged(path, "last member runs past the end of the file")
    if size - handle.offset < _END_MARKER_BYTES:
        raise _damaged(path, f"no end-of-archive marker after byte {handle.offset}")
    fileobj.seek(handle.offset)
    tail = fileobj.read(min(size - handle.offset, _TAIL_CHECK_BYTES))
    if tail.strip(b"\0"):
        raise _damaged(path, f"unreadable data at byte {handle.offset}")


def iter_tar_members(path: Path, *, read_data: bool = True) -> Iterator[tuple[str, str, bytes]]:
    """Yields (key, extension, data) for each regular file of a tar, in archive order.

    With ``read_data=False`` the data is ``b""`` and only headers are read (cheap counting).
    A missing, empty, truncated or non-tar file raises :class:`UserError` naming the shard.
    """
    _check_readable(path)
    try:
        with tarfile.open(path, mode="r:") as handle:
            while (info := handle.next()) is not None:
                if not info.isfile():
                    continue
                data = b""
                if read_data:
                    member = handle.extractfile(info)
                    assert member is not None  # regular files always have a payload
                    data = member.read()
                key, ext = split_member_name(info.name)
                yield key, ext, data
                # tarfile keeps every TarInfo it has seen; dropping them keeps memory flat.
                handle.members.clear()
            _check_tail(handle, path)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise _damaged(path, err) from None


def iter_tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Groups consecutive members with the same key into (key, {extension: data}) samples.

    Samples without an image field are dropped here, so counting and reading agree.
    """
    current_key: str | None = None
    fields: dict[str, bytes] = {}
    for key, ext, data in iter_tar_members(path):
        if key != current_key:
            if current_key is not None and image_field(fields):
                yield current_key, fields
            current_key, fields = key, {}
        fields[ext] = data
    if current_key is not None and image_field(fields):
        yield current_key, fields


def count_tar_samples(path: Path) -> int:
    """Number of distinct keys with an image member, read from headers only."""
    count = 0
    previous_key: str | None = None
    counted_key = False
    for key, ext, _ in iter_tar_members(path, read_data=False):
        if key != previous_key:
            previous_key, counted_key = key, False
        if ext in IMAGE_EXTENSIONS and not counted_key:
            count += 1
            counted_key = True
    return count


# Transparent pixels are composited onto white, the background most images with alpha were drawn for;
# dropping alpha instead would show whatever colour the invisible pixels happen to store.
ALPHA_BACKGROUND = (255, 255, 255)


def _within_pixel_limit(image: Image.Image) -> bool:
    """Whether ``image`` (opened, not yet loaded) decodes to at most PIL's ``MAX_IMAGE_PIXELS``; a larger JPEG
    is shrunk while decoding (by up to 8 per side, JPEG's DCT scaling) when that brings it within the limit."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is None or width * height <= limit:
        return True
    if image.format == "JPEG":
        scale = next((s for s in (2, 4, 8) if (width // s) * (height // s) <= limit), 8)
        image.draft("RGB", (width // scale, height // scale))  # the smallest DCT scale giving at least this
        return image.size[0] * image.size[1] <= limit
    return False


def _as_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16- and 32-bit integer greys scaled from 0-65535, float greys clipped to
    0-255, CMYK and YCbCr converted, alpha composited onto :data:`ALPHA_BACKGROUND`."""
    if image.mode.startswith("I"):  # I;16, I;16B, I: 16-bit PNGs and TIFFs
        array = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).round().astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, ALPHA_BACKGROUND)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image | None:
    """Decodes image bytes to an RGB PIL image (see :func:`_as_rgb`), or returns None when they are not a
    readable image: empty, truncated or corrupt bytes, an unknown format, or an image over PIL's
    ``MAX_IMAGE_PIXELS`` (a decompression bomb) that cannot be decoded smaller."""
    try:
        with warnings.catch_warnings():
            # PIL warns about palette transparency and about images over the pixel limit, which is checked here.
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            if not _within_pixel_limit(image):
                return None
            image.load()
            return _as_rgb(image)
    # Decoders raise a zoo of types (OSError, SyntaxError, ValueError, struct.error, DecompressionBombError,
    # ...); any of them just means "this file is not a usable image".
    except Exception:  # noqa: BLE001
        return None


def decode_field(data: bytes, channels: int) -> np.ndarray | None:
    """Decodes an extra image field (a ``depth.png``, ``normals.png``, ...) to float32 ``[H, W, C]`` in ``[0, 1]``.

    ``channels`` 1 keeps one band: 8-bit images are divided by 255, 16-bit ones (depth PNGs) by
    65535, float (``F``) images are kept as they are; a colour image is reduced to its luminance.
    ``channels`` 3 decodes as RGB (as :func:`decode_rgb`).  None when the bytes are not an image.
    """
    if channels not in (1, 3):
        raise ValueError(f"extra fields have 1 or 3 channels, not {channels}")
    if channels == 3:
        image = decode_rgb(data)
        return None if image is None else np.asarray(image, dtype=np.float32) / 255.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            image.load()
            if image.mode.startswith("I"):  # I;16, I;16B, I: 16-bit (or wider) integers
                array = np.asarray(image, dtype=np.float32) / 65535.0
            elif image.mode == "F":
                array = np.asarray(image, dtype=np.float32)
            else:
                array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except Exception:  # noqa: BLE001 - as in decode_rgb: any decoder failure means "not an image"
        return None
    return array[:, :, None]


def _visible(entry: os.DirEntry[str]) -> bool:
    """False for dot-files such as .DS_Store or .ipynb_checkpoints."""
    return not entry.name.startswith(".")


def is_image_file(path: Path) -> bool:
    """True for a visible file whose extension is a known image type."""
    return path.suffix[1:].lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_below(directory: Path) -> list[Path]:
    """All image files under ``directory`` (recursively), in a stable sorted order."""
    found: list[Path] = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        found.extend(Path(root) / name for name in sorted(files) if is_image_file(Path(name)))
    return found


def _has_image(directory: Path) -> bool:
    """Whether any image lies under ``directory``; stops at the first one."""
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        if any(is_image_file(Path(root) / name) for name in files):
            return True
    return False


def split_dirs(root: Path) -> dict[str, Path]:
    """The ``train``/``test``/``val`` subfolders of ``root`` (empty when it has none)."""
    return {name: root / name for name in SPLIT_NAMES if (root / name).is_dir()}


def class_dirs(root: Path) -> dict[str, Path]:
    """Visible subfolders of ``root`` that hold at least one image, sorted by name.

    Sorting by name matches torchvision's ImageFolder, so labels agree with it on any tree
    it accepts (it rejects empty class folders, which are left out here).
    """
    with os.scandir(root) as entries:
        names = sorted(entry.name for entry in entries if _visible(entry) and entry.is_dir())
    return {name: root / name for name in names if _has_image(root / name)}


def scan_image_folder(
    root: Path, classes: list[str] | None = None
) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """Lists an ImageFolder tree or a flat folder of images.

    Returns (files, labels, classes). Class subfolders make the folder labelled (labels index
    into ``classes``, which defaults to the sorted subfolder names); otherwise the images
    directly inside ``root`` are returned unlabelled with ``labels`` and ``classes`` None.
    """
    by_class = class_dirs(root)
    if by_class:
        names = classes if classes is not None else sorted(by_class)
        files: list[Path] = []
        labels: list[int] = []
        for name, directory in by_class.items():
            images = _images_below(directory)
            files.extend(images)
            labels.extend([names.index(name)] * len(images))
        return files, labels, names
    flat = sorted(path for path in root.iterdir() if path.is_file() and is_image_file(path))
    return flat, None, None
