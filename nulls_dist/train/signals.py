"""Graceful stop on SIGTERM / SIGUSR1 (SLURM's pre-emption and time-limit warnings) and SIGINT (Ctrl-C).

The handler only sets a flag; the trainer checks it at step boundaries (agreeing across ranks on log and
checkpoint steps), writes a checkpoint and exits with `REQUEUE_EXIT_CODE`, which tells a launcher "stopped on
request, resumable: requeue me" as opposed to 0 (finished) or 1 (failed). A second SIGINT stops at once
(KeyboardInterrupt), for a user who does not want to wait for the checkpoint.
"""
from __future__ import annotations

import signal

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL from sysexits.h: a temporary failure, retrying may succeed
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlag:
    """Installs handlers for `STOP_SIGNALS` that record the signal; `restore()` puts the old handlers back."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopFlag":
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C: stopping without a checkpoint")
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
