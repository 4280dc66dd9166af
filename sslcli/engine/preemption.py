"""Preemption: SIGTERM or SIGUSR1 asks the run to checkpoint at the next step boundary and exit.

The signal handler only sets a flag; the training loop reads it between steps (a signal can
arrive mid-backward, where no consistent state exists to save).  SLURM sends SIGUSR1 ahead of
the time limit with ``sbatch --signal=USR1@120`` and SIGTERM on preemption; torchrun forwards
SIGTERM to its workers.  The process then exits with :data:`PREEMPTED_EXIT_CODE`.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

# sysexits.h EX_TEMPFAIL, "temporary failure, the user is invited to retry": distinct from 0 (done),
# 1 (crash), 2 (bad input) and 128+N (killed by signal N), so a job script can requeue on exactly it.
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by the loop once the preemption checkpoint is written."""

    def __init__(self, signal_name: str, checkpoint: str) -> None:
        super().__init__(f"stopped by {signal_name}; checkpoint {checkpoint} written, continue with --resume auto")
        self.signal_name, self.checkpoint = signal_name, checkpoint


class PreemptionFlag:
    """While entered, SIGTERM/SIGUSR1 set :attr:`signal_name` instead of killing the process.

    Handlers can be installed from the main thread only; in any other thread (a notebook's worker,
    a test runner thread) the flag stays unset and the signals keep their previous behaviour.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
