"""Where dreamloom keeps things on this machine: the cache (latents, class images, estimates) and
the studio's home (datasets, the job queue, runs). Environment variables move both."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from .errors import DreamloomError


def cache_root() -> Path:
    return Path(os.environ.get("DREAMLOOM_CACHE") or Path.home() / ".cache" / "dreamloom")


def studio_home(explicit: str | Path | None = None) -> Path:
    """`--home` if given, else $DREAMLOOM_HOME (`dreamloom studio --home` passes it on), else ~/.dreamloom."""
    return Path(explicit or os.environ.get("DREAMLOOM_HOME") or Path.home() / ".dreamloom")


def free_bytes(folder: Path) -> int:
    """Free space on the file system holding `folder` (or its nearest existing parent)."""
    folder = Path(folder).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def check_writable_folder(folder: str | Path, what: str, need_bytes: int = 0) -> Path:
    """Prove, without making anything, that `folder` can be created (if missing) and written, with
    at least `need_bytes` free; otherwise one DreamloomError naming the folder, the cause and the fix."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DreamloomError(f"{what} '{folder}' is a file, not a folder; choose a folder.")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise OSError(errno.ENOTDIR, "Not a directory")
        with tempfile.TemporaryFile(dir=existing):  # the first write shows read-only mounts and permissions
            pass
    except OSError as exc:
        reason = {errno.EROFS: "it is on a read-only file system", errno.EACCES: "you may not write there",
                  errno.ENOTDIR: "a part of the path is a file", errno.ENOSPC: "the disk is full"}.get(
            exc.errno, exc.strerror or str(exc))
        raise DreamloomError(f"{what} '{folder}' cannot be written: {reason}. Choose a writable folder.") from None
    free = free_bytes(existing)
    if free < need_bytes:
        raise DreamloomError(f"{what} '{folder}' has {human_bytes(free)} free; this needs about "
                             f"{human_bytes(need_bytes)}. Free some space or choose another folder.")
    return folder
