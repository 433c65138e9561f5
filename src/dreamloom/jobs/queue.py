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
    command TEXT,                    -- a job that is not a training run: its `dreamloom` arguments, as JSON
    lease_until REAL,                -- a running job's worker renews this; once past, another worker takes it
    attempts INTEGER NOT NULL DEFAULT 0,  -- how many times a worker has started it
    not_before REAL,                 -- a retried job waits until then (backoff)
    submitted_by TEXT,               -- who queued it: the studio login's name, or the CLI's user
    processes INTEGER NOT NULL DEFAULT 1  -- train.processes: a worker owning fewer GPUs leaves it
)
"""
# columns newer than some queues on disk
ADDED_COLUMNS = {"command": "TEXT", "lease_until": "REAL", "attempts": "INTEGER NOT NULL DEFAULT 0",
                 "not_before": "REAL",
                 "submitted_by": "TEXT", "processes": "INTEGER NOT NULL DEFAULT 1"}
SCHEMA_VERSION = 4  # PRAGMA user_version: a queue written by a newer dreamloom is refused, never rewritten
LEASE_SECONDS = 60.0  # a worker that has not renewed its job's lease for this long has lost it
MAX_ATTEMPTS = 3  # a job that failed this many times (a crash, a hang; never bad input) stays failed
BACKOFF_SECONDS = 30.0  # the wait before attempt 2; doubled for each next one


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
    lease_until: float | None = None
    attempts: int = 0
    not_before: float | None = None
    submitted_by: str | None = None
    processes: int = 1

    @property
    def arguments(self) -> list[str] | None:
        """A command job's `dreamloom` arguments (e.g. caption DATA --model M); None for a training job."""
        return json.loads(self.command) if self.command else None


def stop_process(pid: int | None, grace: float = 10.0) -> None:
    """SIGTERM (with SIGCONT, so that a stopped process can act on it: a trainer checkpoints), then
    SIGKILL after `grace` seconds. A process of another machine or user is left alone."""
    import signal

    if not pid_alive(pid):
        return
    for sig in (signal.SIGTERM, signal.SIGCONT):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
    deadline = time.time() + grace
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


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
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise DreamloomError(
                        f"the job queue {self.path} was written by a newer dreamloom (queue version {version}, this "
                        f"one reads up to {SCHEMA_VERSION}); upgrade dreamloom (pip install -U dreamloom), or move "
                        "the file aside to start a new queue (the run directories list every run).")
                db.execute("PRAGMA journal_mode=WAL")  # readers never block the workers
                db.execute(SCHEMA)
                db.execute(NOTICES)
                have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
                for column, kind in ADDED_COLUMNS.items():
                    if column not in have:
                        db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
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

    def submit(self, recipe: Recipe, out_root: str | Path, by: str | None = None) -> int:
        if not recipe.data.path and not recipe.data.folders:
            raise DreamloomError("the job's recipe has no data.path (nor [[data.folders]]): pick a dataset first.")
        cur = self._write("INSERT INTO jobs (name, recipe, out_root, created, submitted_by, processes) "
                          "VALUES (?, ?, ?, ?, ?, ?)", (recipe.name, dump_recipe(recipe), str(Path(out_root).resolve()),
                                                        time.time(), by, recipe.train.processes))
        return cur.lastrowid

    def submit_command(self, name: str, arguments: list[str], by: str | None = None) -> int:
        """A job that runs `dreamloom ARGUMENTS` (captioning a dataset, say) on a worker, not in the studio."""
        cur = self._write("INSERT INTO jobs (name, recipe, out_root, created, command, submitted_by) "
                          "VALUES (?, '', '', ?, ?, ?)", (name, time.time(), json.dumps(arguments), by))
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

    def claim(self, worker_pid: int, device: str | None = None, lease: float = LEASE_SECONDS,
              room: int | None = None) -> Job | None:
        """Take the oldest job that may run now and fits the worker's devices (`device`: CUDA ids
        like "0,1"; None: the machine's, no limit; `room`: the free slots of a Ray cluster): queued
        (and past its backoff), or running under a lease its worker stopped renewing (a hung worker;
        its trainer is stopped first). The write lock makes two workers never take the same one."""
        now = time.time()
        owned = room if room is not None else len(device.split(",")) if device else 1 << 30
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT id, state, trainer_pid FROM jobs WHERE ((state = 'queued' AND (not_before IS NULL "
                             "OR not_before <= ?)) OR (state = 'running' AND lease_until < ?)) AND processes <= ? "
                             "ORDER BY id LIMIT 1", (now, now, owned)).fetchone()
            if row is not None:
                db.execute("UPDATE jobs SET state = 'running', worker_pid = ?, device = ?, started = ?, lease_until = ?, "
                           "attempts = attempts + 1, not_before = NULL, trainer_pid = NULL, error = NULL WHERE id = ?",
                           (worker_pid, device, now, now + lease, row["id"]))
            db.execute("COMMIT")
        if row is None:
            return None
        if row["state"] == "running":  # the lease ran out: its old trainer must not train on beside the new one
            stop_process(row["trainer_pid"])
        return self.get(row["id"])

    def renew(self, job_id: int, worker_pid: int, lease: float = LEASE_SECONDS) -> bool:
        """Extend the worker's lease on its job; False when the job is no longer its own (another
        worker took it over after the lease ran out)."""
        cur = self._write("UPDATE jobs SET lease_until = ? WHERE id = ? AND worker_pid = ? AND state = 'running'",
                          (time.time() + lease, job_id, worker_pid))
        return cur.rowcount == 1

    def retry_or_fail(self, job: Job, error: str, max_attempts: int = MAX_ATTEMPTS,
                      backoff: float = BACKOFF_SECONDS) -> str:
        """After a crash or a hang: queued again after a backoff (it resumes from its checkpoint), or
        failed once it has had `max_attempts` starts; returns the new state."""
        if job.attempts < max_attempts:
            wait = backoff * 2 ** (job.attempts - 1)
            self.update(job.id, state="queued", worker_pid=None, trainer_pid=None, lease_until=None,
                        not_before=time.time() + wait,
                        error=f"attempt {job.attempts} of {max_attempts} failed, retried in {wait:.0f} s: {error}")
            return "queued"
        self.update(job.id, state="failed", error=f"failed {job.attempts} time(s); the last error: {error}",
                    finished=time.time(), trainer_pid=None, lease_until=None)
        return "failed"

    def waiting_reason(self, job: Job, jobs: list[Job] | None = None) -> str:
        """Why a queued job has not started, in words: its place in line, or its backoff."""
        if job.state != "queued":
            return ""
        now = time.time()
        if job.not_before and job.not_before > now:
            return f"retry {job.attempts + 1} in {job.not_before - now:.0f} s"
        jobs = self.jobs() if jobs is None else jobs
        running = sum(1 for j in jobs if j.state == "running")
        ahead = sum(1 for j in jobs if j.state == "queued" and j.id < job.id)
        line = f"{ahead} queued ahead" if ahead else "next in line"
        if job.processes > 1:
            ids = ",".join(str(i) for i in range(job.processes))
            line += f"; needs a worker of {job.processes} GPUs (jobs worker --devices {ids} --per-worker {job.processes})"
        return f"{line}; waiting for a free worker ({running} running)" if running else line

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
