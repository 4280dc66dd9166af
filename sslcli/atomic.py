"""Every file sslcli writes for a user appears whole or not at all."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sslcli.errors import UserError

# A full disk or an exhausted quota is the user's to fix, not a crash: one line naming the file instead.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def fsync_file(path: Path) -> None:
    """Flushes ``path``'s data to the disk, so the rename that follows never publishes an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary sibling of ``path`` for the block to write; fsynced and renamed over ``path`` when the
    block ends without error and removed when it raises, so no reader, and no crash, ever sees half a file
    (the old file stays until the rename).  Running out of space raises :class:`UserError`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        raise UserError(f"no space left writing '{path}' ({os.strerror(err.errno)}); free space on that disk (or "
                        "quota) or write elsewhere, then run again: the previous file, if any, is unchanged") from None
    finally:
        tmp.unlink(missing_ok=True)
