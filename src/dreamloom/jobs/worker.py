"""A worker: takes jobs from the queue one at a time, makes each job's run directory (once: a rerun
uses the same one) and trains it in a `python -m dreamloom.trainers RUN` process on its device. A
job whose worker died is resumed from its checkpoint by the next one."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import DreamloomError, TrainingStopped
from ..recipes.io import recipe_from_text
from ..rundir import MARKER, RunDir
from ..trainers.launch import trainer_command
from .heartbeat import ENV as HEARTBEAT_ENV
from .heartbeat import silence
from .queue import BACKOFF_SECONDS, LEASE_SECONDS, MAX_ATTEMPTS, Job, JobQueue, stop_process

def _die_with_parent() -> None:
    """In the trainer: receive SIGTERM when the worker dies, so it checkpoints and stops instead
    of training on unattended (Linux; elsewhere the orphan runs to its end)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def job_log(queue: JobQueue, job_id: int) -> Path:
    return queue.home / "logs" / f"job-{job_id}.log"


def job_run(queue: JobQueue, job: Job) -> RunDir:
    """The job's run directory: made the first time the job runs and recorded at once, so that a
    rerun (after a crash before the first checkpoint, a cancel, a dead worker) trains in it again."""
    if job.run_dir and (Path(job.run_dir) / MARKER).is_file():
        return RunDir.open(job.run_dir)
    run = RunDir.create(job.out_root, recipe_from_text(job.recipe, f"of job {job.id}"))
    queue.update(job.id, run_dir=str(run.path))
    return run


HANG_SECONDS = 300.0  # a process whose heartbeat has been silent this long is hung, not busy
BAD_INPUT = 2  # the exit code of a user-fixable error: retrying it would fail the same way


@dataclass
class Policy:
    """How a worker treats a job that crashes or hangs."""

    hang: float = HANG_SECONDS
    retries: int = MAX_ATTEMPTS  # starts a job gets in all
    backoff: float = BACKOFF_SECONDS
    lease: float = LEASE_SECONDS


def run_job(queue: JobQueue, job: Job, device: str | None, poll: float = 0.5, policy: Policy | None = None) -> str:
    """Run one claimed job to its end, renewing its lease and watching its heartbeat; returns its
    state afterwards ('queued' again when it crashed or hung and has attempts left)."""
    policy = policy or Policy()
    hang, lease = policy.hang, policy.lease

    def retry(error: str) -> str:
        return queue.retry_or_fail(job, error, policy.retries, policy.backoff)

    log = job_log(queue, job.id)
    log.parent.mkdir(parents=True, exist_ok=True)
    run = None
    if job.arguments is not None:  # not a training run: `dreamloom ARGUMENTS`, watched the same way
        command = [sys.executable, "-m", "dreamloom", *job.arguments]
        where = ""
    else:
        try:
            run = job_run(queue, job)
        except (DreamloomError, OSError) as exc:  # a recipe this version cannot read, an unwritable folder
            queue.finish(job.id, "failed", str(exc))
            return "failed"
        if run.is_finished():  # its trainer ended but the worker died before it could say so
            queue.finish(job.id, "finished")
            return "finished"
        command, where = trainer_command(run.path, job.processes), f" in {run.path}"
    heartbeat = log.with_suffix(".heartbeat")
    heartbeat.touch()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{HEARTBEAT_ENV: str(heartbeat)})
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    with open(log, "a") as out:
        out.write(f"--- worker {os.getpid()} starts job {job.id} (attempt {job.attempts}){where} ---\n")
        out.flush()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent)
    queue.update(job.id, trainer_pid=proc.pid)
    asked_to_stop, hung, renewed = False, False, time.time()
    while proc.poll() is None:
        time.sleep(poll)
        if time.time() - renewed > lease / 4:
            if not queue.renew(job.id, os.getpid(), lease):  # taken over after this worker stalled
                stop_process(proc.pid)
                return "lost"
            renewed = time.time()
        if silence(heartbeat) > hang:
            _note(log, f"its process sent no heartbeat for {silence(heartbeat):.0f} s: stopped as hung")
            stop_process(proc.pid)
            hung = True
            break
        current = queue.get(job.id)
        if current.cancel_requested and not asked_to_stop:
            proc.send_signal(signal.SIGTERM)  # the trainer checkpoints, then exits
            asked_to_stop = True
    proc.wait()
    tail = "\n".join(log.read_text().strip().splitlines()[-3:]) or f"exit code {proc.returncode}"
    if hung:
        return retry(f"hung (no heartbeat for {hang:.0f} s)")
    return settle(queue, job, run, proc.returncode, asked_to_stop, tail, policy)


def settle(queue: JobQueue, job: Job, run: RunDir | None, code: int, asked_to_stop: bool, error: str,
           policy: Policy) -> str:
    """A job's state once its process ended with `code` (`run`: None for a command job), for a local
    worker and a Ray one alike."""
    if code == 0 and (run is None or run.is_finished()):
        state, error = "finished", None
    elif asked_to_stop and (code == TrainingStopped.exit_code or run is None
                            or run.stopped()):  # the launcher of several processes has its own exit code
        state, error = "cancelled", None
    elif code == BAD_INPUT:
        state = "failed"
    else:  # a crash, a kill, or an exit without the run's end event: never shown as running or finished
        why = error if code != 0 else "the trainer exited without finishing its run"
        return queue.retry_or_fail(job, why, policy.retries, policy.backoff)
    queue.finish(job.id, state, error)
    return state


def _note(log: Path, line: str) -> None:
    with open(log, "a") as out:
        out.write(f"--- worker {os.getpid()}: {line} ---\n")


def run_worker(home: str | Path, device: str | None = None, once: bool = False, poll: float = 1.0,
               policy: Policy | None = None) -> None:
    """Serve the queue until killed (or, with once, until it is empty)."""
    queue = JobQueue(home)
    for job_id in queue.recover_orphans():
        print(f"job {job_id}: its worker had died; queued again, it resumes from its checkpoint", flush=True)
    while True:
        job = queue.claim(os.getpid(), device, lease=(policy or Policy()).lease)
        if job is None:
            if once:
                return
            time.sleep(poll)
            continue
        print(f"job {job.id} ({job.name}) started on {device or 'the default device'}", flush=True)
        print(f"job {job.id}: {run_job(queue, job, device, policy=policy)}", flush=True)
