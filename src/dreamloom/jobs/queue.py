"""The job queue: one SQLite file in the studio's home folder, shared by the dashboard (which
only submits and reads), the CLI and any number of workers (which claim jobs atomically)."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from ..errors import DreamloomError
from ..recipes import Recipe, dump_recipe
from .recovery import damage, jobs_from_runs, set_aside

STATES = ("queued", "running", "finished", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    recipe TEXT NOT NULL,            -- the resolved recipe, as TOML
    out_root TEXT NOT NULL,          -- where the run directory goes
    run_dir TEXT,                    -- known once the trainer has made it; resume uses it
    worker_pid INTEGER,
    trainer_pid INTEGER,
    device TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    command TEXT                     -- a job that is not a training run: its `dreamloom` arguments, as JSON
)
"""
ADDED_COLUMNS = {"command": "TEXT"}  # columns newer than some queues on disk


NOTICES = "CREATE TABLE IF NOT EXISTS notices (created REAL NOT NULL, message TEXT NOT NULL)"


@dataclass(frozen=True)
class Job:
    id: int
    name: str
    state: str
    recipe: str
    out_root: str
    run_dir: str | None
    worker_pid: int | None
    trainer_pid: int | None
    device: str | None
    cancel_requested: int
    error: str | None
    created: float
    started: float | None
    finished: float | None
    command: str | None = None

    @property
    def arguments(self) -> list[str] | None:
        """A command job's `dreamloom` arguments (e.g. caption DATA --model M); None for a training job."""
        return json.loads(self.command) if self.command else None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped) counts as dead
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class JobQueue:
    def __init__(self, home: str | Path):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.path = self.home / "jobs.db"
        with open(self.home / ".jobs.lock", "a") as lock:  # one process checks (and repairs) at a time
            fcntl.flock(lock, fcntl.LOCK_EX)
            reason = damage(self.path)
            if reason is not None:
                aside = set_aside(self.path)
            with closing(self._connect()) as db, db:
                db.execute("PRAGMA journal_mode=WAL")  # readers never block the workers
                db.execute(SCHEMA)
                db.execute(NOTICES)
                have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
                for column, kind in ADDED_COLUMNS.items():
                    if column not in have:
                        db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
            if reason is not None:
                self._repair(reason, aside)

    def _repair(self, reason: str, aside: Path) -> None:
        rows = jobs_from_runs(self.home / "runs")
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            for row in rows:
                db.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
            message = (f"the job queue {self.path} was damaged ({reason}); it was kept as {aside.name} and a new "
                       f"one made, listing the {len(rows)} run(s) found in {self.home / 'runs'} (failed or "
                       "unfinished ones can be resumed). Nothing in the run directories was touched.")
            db.execute("INSERT INTO notices (created, message) VALUES (?, ?)", (time.time(), message))
            db.execute("COMMIT")
        print(f"warning: {message}", file=sys.stderr, flush=True)

    def notices(self) -> list[str]:
        """What the queue has had to tell its users (a repair), newest first."""
        with closing(self._connect()) as db:
            return [row["message"] for row in db.execute("SELECT message FROM notices ORDER BY created DESC")]

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def _write(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            cur = db.execute(sql, args)
            db.execute("COMMIT")
            return cur

    def submit(self, recipe: Recipe, out_root: str | Path) -> int:
        if not recipe.data.path and not recipe.data.folders:
            raise DreamloomError("the job's recipe has no data.path (nor [[data.folders]]): pick a dataset first.")
        cur = self._write("INSERT INTO jobs (name, recipe, out_root, created) VALUES (?, ?, ?, ?)",
                          (recipe.name, dump_recipe(recipe), str(Path(out_root).resolve()), time.time()))
        return cur.lastrowid

    def submit_command(self, name: str, arguments: list[str]) -> int:
        """A job that runs `dreamloom ARGUMENTS` (captioning a dataset, say) on a worker, not in the studio."""
        cur = self._write("INSERT INTO jobs (name, recipe, out_root, created, command) VALUES (?, '', '', ?, ?)",
                          (name, time.time(), json.dumps(arguments)))
        return cur.lastrowid

    def jobs(self) -> list[Job]:
        with closing(self._connect()) as db:
            return [Job(**dict(row)) for row in db.execute("SELECT * FROM jobs ORDER BY id DESC")]

    def get(self, job_id: int) -> Job:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise DreamloomError(f"no job {job_id} in {self.path}; `dreamloom jobs list` shows them.")
        return Job(**dict(row))

    def claim(self, worker_pid: int, device: str | None = None) -> Job | None:
        """Take the oldest queued job; the write lock makes two workers never take the same one."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1").fetchone()
            if row is not None:
                db.execute("UPDATE jobs SET state = 'running', worker_pid = ?, device = ?, started = ?, "
                           "error = NULL WHERE id = ?", (worker_pid, device, time.time(), row["id"]))
            db.execute("COMMIT")
        return self.get(row["id"]) if row is not None else None

    def update(self, job_id: int, **fields) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._write(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))

    def finish(self, job_id: int, state: str, error: str | None = None) -> None:
        self.update(job_id, state=state, error=error, finished=time.time(), trainer_pid=None)

    def cancel(self, job_id: int) -> str:
        """A queued job is cancelled at once; a running one is asked to checkpoint and stop."""
        job = self.get(job_id)
        if job.state == "queued":
            self.finish(job_id, "cancelled")
            return "cancelled"
        if job.state == "running":
            self.update(job_id, cancel_requested=1)
            return "cancelling"
        raise DreamloomError(f"job {job_id} is {job.state}; only queued or running jobs can be cancelled.")

    def requeue(self, job_id: int) -> None:
        """Run a failed or cancelled job again; it resumes from its run's latest checkpoint."""
        job = self.get(job_id)
        if job.state not in ("failed", "cancelled"):
            raise DreamloomError(f"job {job_id} is {job.state}; only failed or cancelled jobs can be resumed.")
        self.update(job_id, state="queued", cancel_requested=0, error=None, finished=None)

    def recover_orphans(self) -> list[int]:
        """Jobs left 'running' by a worker that died: back in the queue, once their trainer has
        stopped (it checkpoints on the way out), so they resume from the checkpoint."""
        recovered = []
        for job in self.jobs():
            if job.state == "running" and not pid_alive(job.worker_pid):
                deadline = time.time() + 120
                while pid_alive(job.trainer_pid) and time.time() < deadline:
                    time.sleep(0.2)
                self.update(job.id, state="queued", worker_pid=None, trainer_pid=None)
                recovered.append(job.id)
        return recovered
