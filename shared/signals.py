"""Stop a long loop at a safe point on SIGTERM (schedulers, spot machines) or Ctrl-C."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Set when a stop signal arrived; the loop checks it between units of work it can resume."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    def __bool__(self) -> bool:
        return self.signal_number is not None


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """While active, SIGTERM and SIGINT set the yielded request instead of ending the process.
    The first signal puts the previous handlers back, so a second one acts at once (kills, or
    raises KeyboardInterrupt). Outside the main thread, where Python cannot catch signals,
    the request is never set."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}

    def handler(number: int, frame: object) -> None:
        request.signal_number = number
        for other, action in previous.items():
            signal.signal(other, action)

    for number in STOP_SIGNALS:
        signal.signal(number, handler)
    try:
        yield request
    finally:
        for number, action in previous.items():
            signal.signal(number, action)
