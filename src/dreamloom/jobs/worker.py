"""A worker: takes jobs from the queue one at a time and runs each as a `dreamloom train`
process on its device. A job whose worker died is resumed from its checkpoint by the next one."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..errors import TrainingStopped
from ..jobs import RunDir
from .queue import Job, JobQueue

RUN_DIR_LINE = "run directory: "


def _die_with_parent() -> None:
    """In the trainer: receive SIGTERM when the worker dies, so it checkpoints and stops instead
    of training on unattended (Linux; elsewhere the orphan runs to its end)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def job_log(queue: JobQueue, job_id: int) -> Path:
    return queue.home / "logs" / f"job-{job_id}.log"


def train_command(queue: JobQueue, job: Job) -> list[str]:
    base = [sys.executable, "-m", "dreamloom", "train"]
    if job.run_dir and RunDir.open(job.run_dir).latest_checkpoint() is not None:
        return base + ["--resume", job.run_dir]
    recipe = queue.home / "recipes" / f"job-{job.id}.toml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(job.recipe)
    return base + [str(recipe), "--out", job.out_root]


def run_job(queue: JobQueue, job: Job, device: str | None, poll: float = 0.5) -> str:
    """Run one claimed job to its end; returns its final state."""
    log = job_log(queue, job.id)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    with open(log, "a") as out:
        out.write(f"--- worker {os.getpid()} starts job {job.id} ---\n")
        out.flush()
        proc = subprocess.Popen(train_command(queue, job), stdout=out, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent)
    queue.update(job.id, trainer_pid=proc.pid)
    asked_to_stop = False
    while proc.poll() is None:
        time.sleep(poll)
        current = queue.get(job.id)
        if current.run_dir is None:
            for line in log.read_text().splitlines():
                if line.startswith(RUN_DIR_LINE):
                    queue.update(job.id, run_dir=line.removeprefix(RUN_DIR_LINE).strip())
        if current.cancel_requested and not asked_to_stop:
            proc.send_signal(signal.SIGTERM)  # the trainer checkpoints, then exits
            asked_to_stop = True
    if proc.returncode == 0:
        state, error = "finished", None
    elif asked_to_stop and proc.returncode == TrainingStopped.exit_code:
        state, error = "cancelled", None
    else:
        tail = log.read_text().strip().splitlines()[-3:]
        state, error = "failed", "\n".join(tail) or f"exit code {proc.returncode}"
    queue.finish(job.id, state, error)
    return state


def run_worker(home: str | Path, device: str | None = None, once: bool = False, poll: float = 1.0) -> None:
    """Serve the queue until killed (or, with once, until it is empty)."""
    queue = JobQueue(home)
    for job_id in queue.recover_orphans():
        print(f"job {job_id}: its worker had died; queued again, it resumes from its checkpoint", flush=True)
    while True:
        job = queue.claim(os.getpid(), device)
        if job is None:
            if once:
                return
            time.sleep(poll)
            continue
        print(f"job {job.id} ({job.name}) started on {device or 'the default device'}", flush=True)
        print(f"job {job.id}: {run_job(queue, job, device)}", flush=True)
