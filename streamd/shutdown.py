"""Bounded shutdown: whatever a library does on SIGTERM, the process ends within the drain bound.

faust can hang in ``wait_empty`` and Celery's warm shutdown waits for running
tasks without limit. Both are given ``STREAMD_DRAIN_TIMEOUT_S``; after that
the watchdog ends the process. Nothing is lost by that: the daemon's
uncommitted input is read again by the next daemon, and a worker's
unacknowledged tasks are redelivered by the broker.
"""

from __future__ import annotations

import logging
import os
import threading
import time

__all__ = ["start_drain_watchdog", "EXIT_DRAIN_TIMEOUT"]

log = logging.getLogger(__name__)

#: Exit status when the drain bound ran out.
EXIT_DRAIN_TIMEOUT = 3
_started = threading.Event()


def start_drain_watchdog(timeout_s: float, *, what: str) -> None:
    """Start (once) a thread that ends this process ``timeout_s`` from now."""
    if _started.is_set():
        return
    _started.set()
    log.info("%s: shutting down; draining work in flight for at most %.0f s", what, timeout_s)

    def expire() -> None:
        time.sleep(timeout_s)
        log.error("%s: drain did not finish within %.0f s; exiting now (unfinished work is redelivered)",
                  what, timeout_s)
        logging.shutdown()
        os._exit(EXIT_DRAIN_TIMEOUT)

    threading.Thread(target=expire, name="drain-watchdog", daemon=True).start()
