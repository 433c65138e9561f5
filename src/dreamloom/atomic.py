"""Writing files and folders atomically, the one way dreamloom does it.

The content goes to a fresh temp name in the target's own folder, created exclusively (O_EXCL:
a link someone planted under a predictable name is never followed), and is renamed onto the
target only when it is complete. A kill or a full disk mid-write leaves the previous file (or
none), never half of one, and the temp name is removed on any failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FILE_MODE, DIR_MODE = 0o644, 0o755  # mkstemp/mkdtemp make private entries; exports are ordinary files


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A new empty temp file beside `path`, for writers that want a file name (torch.save, PIL,
    safetensors); it becomes `path` when the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """`data` (text is written as UTF-8) as the whole content of `path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A new empty temp folder beside `path`; when the block succeeds it replaces `path` (a folder
    of that name that existed before is removed only then)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_temp_name(name: str) -> bool:
    """Whether a file or folder name is one of ours, being written (skip it when listing)."""
    return name.startswith(".") and name.endswith(".tmp")
