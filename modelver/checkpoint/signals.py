"""Graceful stop: SIGTERM/SIGINT recorded instead of killing, so the loop saves and exits.

Shared by :class:`~modelver.CheckpointManager` (``handle_signals=True``) and the Hugging Face
Trainer integration. The first signal only sets :attr:`StopSignals.signum`; the caller saves a
final checkpoint and raises :class:`~modelver.errors.TrainingInterrupted`. A second signal
puts the previous handler back and raises the signal again, as if modelver were not there
(a user pressing Ctrl-C twice, a scheduler that stops waiting).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """The stop-signal handlers of one training loop; :meth:`install` them, then
    :meth:`uninstall` (or use it as a context manager, which does both)."""

    def __init__(self, *, needs: str) -> None:
        self.signum: int | None = None  # the first stop signal received, None before
        self._needs = needs  # what must run in the main thread, for the error
        self._old: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._old)

    def check_thread(self) -> None:
        """Refuse early, before anything is set up, where :meth:`install` would refuse."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(f"handle_signals=True needs {self._needs} in the main thread")

    def install(self) -> None:
        """Replace the SIGTERM and SIGINT handlers (only the main thread may)."""
        self.check_thread()
        for sig in SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Put the previous handlers back; safe to call twice."""
        for sig, previous in self._old.items():
            signal.signal(sig, previous)
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # second signal: behave as if we were not there
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()
