"""SIGTERM (schedulers, `timeout`, `kill`) and SIGINT (Ctrl+C) stop a run cleanly: at the next optimizer step it
saves a resumable last.ckpt, prints one line and exits 143 / 130, so that a `train && merge` pipeline stops."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any


class RunStopped(Exception):
    """A signal stopped the run after saving a resumable last.ckpt; the CLI exits with 128 + the signal number."""

    def __init__(self, signum: int, step: int, resumable: Path | None) -> None:
        self.signum, self.step, self.resumable = signum, step, resumable
        where = f"{resumable} holds it (continue with --resume true)" if resumable else "nothing was saved"
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; {where}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """While active, SIGTERM and SIGINT do not kill the run: the first one is recorded (`received`) and the run
    stops at the next optimizer step. Later ones are ignored: the save in progress is atomic, and SIGKILL remains.

    Lightning installs its own SIGTERM handler when `fit` starts (it would end the process with status 0 at the
    next batch, even in the middle of an accumulation), so `install()` is called again once training has started."""

    HANDLED = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; it is the one the signals are delivered to
        for s in self.HANDLED:
            previous = signal.signal(s, self._handle)
            self._previous.setdefault(s, previous)

    def __enter__(self) -> "StopSignals":
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}
