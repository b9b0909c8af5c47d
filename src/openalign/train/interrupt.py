"""Ctrl-C (SIGINT) and SIGTERM during training: finish the step in progress, save a checkpoint, stop.

Without this, an interrupt before the first checkpoint (cpu-small saves every 200 steps) loses the whole run.
The first signal only asks: the loop reads `StopRequest.requested` at the end of each step, every rank takes the
decision together (the trainer's collective vote), the checkpoint is written by the run's own atomic save, and
the command names it and `--resume latest`. The handlers are put back at the first signal, so a second Ctrl-C
interrupts at once (KeyboardInterrupt: a save in progress leaves only its temporary folder, which the next start
removes, and the checkpoints before it intact) and a second SIGTERM terminates as it always does.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A context that turns the first SIGINT or SIGTERM into a request to stop after the step in progress.

    Signal handlers can only be set from the main thread; elsewhere (a run started from a worker thread) the
    context changes nothing and `requested` stays false. Data-loader workers forked inside the context inherit
    the handler, and a terminal's Ctrl-C reaches them too: there it does nothing, so they go on serving batches
    while the training process decides."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._process = os.getpid()

    @property
    def requested(self) -> bool:
        """Whether a signal asked the run to stop."""
        return self.signal_name is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                previous = signal.signal(number, self._handle)
                # None: a handler set outside Python, which cannot be put back as such; the default stands in.
                self._previous[number] = signal.SIG_DFL if previous is None else previous
        return self

    def __exit__(self, *exception) -> None:
        self._restore()

    def _handle(self, number: int, frame) -> None:
        if os.getpid() != self._process:  # a forked data-loader worker
            return
        self.signal_name = signal.Signals(number).name
        self._restore()  # a second signal acts at once
        logger.warning("%s: finishing the step in progress and saving a checkpoint; press Ctrl-C again to stop "
                       "at once without it", self.signal_name)

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
