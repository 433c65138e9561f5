"""A damaged or emptied `jobs.db` (a truncated copy, a disk error, a stray `> jobs.db`) must not
make every job silently disappear: the damaged file is kept aside, the user is told in one line,
and the list of runs is rebuilt from the run directories, which hold everything a run made."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path

from ..rundir import MARKER, RunDir

SIDECARS = ("-wal", "-shm")  # SQLite's write-ahead log and its index, which go with the file


def damage(path: Path) -> str | None:
    """Why the queue file at `path` cannot be trusted, or None when it is sound (or absent)."""
    if not path.exists():
        return None
    if path.stat().st_size == 0:  # JobQueue writes its schema the moment it makes the file
        return "it is empty (0 bytes)"
    try:
        with closing(sqlite3.connect(path, timeout=30)) as db:
            found = db.execute("PRAGMA quick_check").fetchone()[0]
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        return f"SQLite cannot read it ({exc})"
    if found != "ok":
        return f"SQLite's integrity check failed ({found})"
    if "jobs" not in tables:
        return "it has no jobs table"
    return None


def set_aside(path: Path) -> Path:
    """Rename the damaged file (and its WAL files) to `<name>.damaged-<time>`; returns the new name."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    for suffix in ("", *SIDECARS):
        source = path.with_name(path.name + suffix)
        if source.exists():
            source.rename(aside.with_name(aside.name + suffix))
    return aside


def job_from_run(run: RunDir) -> dict | None:
    """The queue row a run directory stands for, or None when it is not a readable run."""
    try:
        recipe_text = (run.path / "recipe.toml").read_text()
        events = run.events()
        recipe = run.recipe()
    except Exception:  # a recipe this version cannot read: the folder stays where it is, unlisted
        return None
    kinds = [e["event"] for e in events]
    if "end" in kinds:
        state, error = "finished", None
    else:  # resumable from its checkpoint: Resume continues it
        state = "failed" if kinds and kinds[-1] == "error" else "cancelled"
        error = "recovered from its run directory after the job queue was damaged; Resume continues it"
    created = (run.path / MARKER).stat().st_mtime
    finished = events[-1]["time"] if events else created
    return {"name": recipe.name, "processes": recipe.train.processes, "state": state, "recipe": recipe_text, "out_root": str(run.path.parent),
            "run_dir": str(run.path), "error": error, "created": created, "finished": finished}


def jobs_from_runs(runs_root: Path) -> list[dict]:
    folders = sorted((p for p in runs_root.glob("*") if (p / MARKER).is_file()), key=lambda p: (p / MARKER).stat().st_mtime)
    return [row for row in (job_from_run(RunDir(p)) for p in folders) if row is not None]
