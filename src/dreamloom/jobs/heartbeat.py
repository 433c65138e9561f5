"""How the worker tells a hung process from a busy one: every `dreamloom` process it starts touches
a heartbeat file (named in DREAMLOOM_HEARTBEAT) from a thread, every few seconds. A process that is
stopped (SIGSTOP), frozen or swapped out stops touching it; one that merely computes a long step
does not, because torch releases the interpreter while it computes."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

ENV = "DREAMLOOM_HEARTBEAT"
INTERVAL = 1.0  # seconds between beats


def start_from_environment() -> None:
    """Beat into the file the worker named, if it named one (a process started by hand beats nowhere)."""
    path = os.environ.get(ENV)
    if not path:
        return

    def beat() -> None:
        while True:
            try:
                Path(path).touch()
            except OSError:
                pass  # a full disk must not kill the process; the worker sees the silence
            time.sleep(INTERVAL)
    threading.Thread(target=beat, name="dreamloom-heartbeat", daemon=True).start()


def silence(path: Path) -> float:
    """Seconds since the last beat (since the file was made, before the first one)."""
    try:
        return time.time() - Path(path).stat().st_mtime
    except FileNotFoundError:
        return float("inf")
