"""One writer per run directory: an exclusive ``flock`` on ``RUN/.lock`` for as long as a run trains.

A second ``sslcli pretrain --out RUN`` (with ``--resume`` or ``--overwrite``) started while the first still
writes would interleave checkpoints or delete them under it; it fails at once instead.  The kernel drops
the lock when its holder exits, however it exits (``kill -9``, preemption), so a crashed run never stays
locked and no stale-lock clean-up exists.  Only rank 0 writes a run, so only rank 0 locks it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sslcli import distributed as dist
from sslcli.errors import UserError

LOCK_NAME = ".lock"


@contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """Holds ``run``'s lock for the block (creating ``run``); :class:`UserError` if another process holds it."""
    if not dist.is_main():
        yield
        return
    run = Path(run)
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    fh = open(run / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "unknown"
            raise UserError(f"run directory '{run}' is in use by another sslcli process (pid {pid}); wait for it "
                            "to finish or stop it, or choose another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()  # closing the only descriptor releases the lock
        # A run that failed before writing anything (bad options) leaves no empty directory behind.
        if created and [p.name for p in run.iterdir()] == [LOCK_NAME]:
            (run / LOCK_NAME).unlink(missing_ok=True)
            run.rmdir()
