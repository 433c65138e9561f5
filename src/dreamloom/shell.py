"""What every entry point (the CLI, the trainer process, the studio) does the same way: keep the
libraries' notices off the terminal, and turn the errors a user can fix into one line and an exit
code instead of a traceback."""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable

from .errors import DreamloomError, TrainingStopped

INTERRUPTED = 130  # what shells report for a command stopped by Ctrl-C
# OS errors that are the machine's state, not a bug: said in one line with the path.
USER_OS_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
                  errno.EACCES: "permission denied", errno.EDQUOT: "the disk quota is exceeded"}


def quiet_libraries() -> None:
    """Keep the terminal for dreamloom's own output: the libraries' import-time notices (no
    torchvision, no optional CPU kernels, no text-encoder keys in a UNet-only LoRA) are noise
    to a user. Setting the variables yourself brings them back."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own bar is the one that matters


def run_command(command: Callable[[], int]) -> int:
    """Run `command`; a user-fixable error is printed as `error: ...` (exit 2), a stop with a
    checkpoint as itself (exit 3), Ctrl-C as one line (exit 130). Under a queue worker, the process
    beats a heartbeat while it runs (jobs/heartbeat.py)."""
    from .jobs.heartbeat import start_from_environment

    start_from_environment()
    try:
        return command()
    except TrainingStopped as exc:
        print(str(exc), file=sys.stderr)
        return TrainingStopped.exit_code
    except DreamloomError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        return INTERRUPTED
    except OSError as exc:
        if exc.errno not in USER_OS_ERRORS:
            raise
        where = f" writing '{exc.filename}'" if exc.filename else ""
        print(f"error: {USER_OS_ERRORS[exc.errno]}{where}; free some space or choose a writable folder, "
              "then run the command again.", file=sys.stderr)
        return 2
