"""Ctrl-C and SIGTERM during training: finish the step, save, say how to resume.

The first SIGINT or SIGTERM asks the loop to stop after the step in progress (`requested`
names the signal); the loop then writes a checkpoint and the adapter and stops with a non-zero
exit code (128 + the signal number, the shell's convention). A second SIGINT exits at once
(KeyboardInterrupt): only what the last save holds survives. Handlers are installed for the
duration of the `with` block and only from the main thread (signal handlers cannot be set
elsewhere; a run started from another thread keeps Python's default behaviour).
"""

from __future__ import annotations

import signal
import threading


class StopRequests:
    def __init__(self, echo=print):
        self.echo = echo
        self.requested: str | None = None  # "SIGINT" / "SIGTERM" once one arrived
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: out now
            return
        self.requested, self.signum = name, signum
        self.echo(f"{name}: finishing the current step, then saving a checkpoint and the adapter "
                  f"(Ctrl-C again to quit at once, losing the steps since the last save)")
