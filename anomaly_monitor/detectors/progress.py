"""Progress of ``fit``: a bar on a terminal, log lines otherwise.

Training takes minutes on large tables. With ``verbose`` (a terminal) a tqdm bar
shows the epochs; without it, a line is logged at INFO every
:data:`LOG_EVERY_SECONDS` (and one when training ends), so that a service log or
``anomaly-monitor -v train`` from cron shows that training goes on and how long
is left.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType

from tqdm.auto import tqdm

log = logging.getLogger("anomaly_monitor.training")

#: Seconds between two progress lines in the log.
LOG_EVERY_SECONDS = 10.0

_local = threading.local()


class FitCancelledError(Exception):
    """A fit stopped at an epoch's end because its thread's cancel event was set."""


@contextlib.contextmanager
def cancellable(event: threading.Event) -> Iterator[None]:
    """Within the block, fits in this thread stop at the next epoch once ``event`` is
    set (:class:`FitCancelledError`): a stopping worker ends a retrain cleanly."""
    previous = getattr(_local, "event", None)
    _local.event = event
    try:
        yield
    finally:
        _local.event = previous


class FitProgress:
    """Count the epochs of a fit (``total`` of them); a context manager."""

    def __init__(self, total: int, description: str, *, bar: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.description = description
        #: Epochs run, and epochs left out by early stopping.
        self.run = self.skipped = 0
        self.postfix = ""
        self._clock = clock
        self._started = self._logged = clock()
        self._bar = tqdm(total=total, desc=description, unit="epoch") if bar else None

    def __enter__(self) -> FitProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.close()
        elif kind is None:
            stopped = f" ({self.skipped} left out by early stopping)" if self.skipped else ""
            log.info("%s: done, %d epochs run%s in %.0f s%s", self.description, self.run,
                     stopped, self._clock() - self._started, self.postfix)

    def update(self, epochs: int) -> None:
        """Count ``epochs`` more epochs run; :class:`FitCancelledError` when this thread's fit
        was cancelled (:func:`cancellable`)."""
        self.run += epochs
        self._advance(epochs)
        event = getattr(_local, "event", None)
        if event is not None and event.is_set():
            raise FitCancelledError("the fit was cancelled")

    def skip(self, epochs: int) -> None:
        """Count ``epochs`` that early stopping leaves out (they take no time)."""
        self.skipped += epochs
        self._advance(epochs)

    def _advance(self, epochs: int) -> None:
        if self._bar is not None:
            self._bar.update(epochs)
            return
        now = self._clock()
        done = min(self.total, self.run + self.skipped)
        if now - self._logged >= LOG_EVERY_SECONDS and done < self.total:
            self._logged = now
            elapsed = now - self._started
            # At the pace of the epochs run so far; early stopping may end it sooner.
            left = elapsed / max(1, self.run) * (self.total - done)
            log.info("%s: %d/%d epochs (%.0f%%), %.0f s so far, at most about %.0f s "
                     "left%s", self.description, done, self.total, 100 * done / self.total,
                     elapsed, left, self.postfix)

    def set_postfix(self, **values: str) -> None:
        """Show ``values`` (e.g. the validation loss) after the count."""
        if self._bar is not None:
            self._bar.set_postfix(**values)
        self.postfix = "".join(f", {name} {value}" for name, value in values.items())
