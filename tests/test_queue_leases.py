"""A queue that never wedges: leases a hung worker loses, heartbeats that tell a hung trainer from a
busy one, retries with a limit and a backoff, bad input never retried, the reason a job waits, and
a queue file from a newer dreamloom refused without being touched."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from dreamloom.cli import main
from dreamloom.errors import DreamloomError
from dreamloom.jobs.queue import JobQueue, pid_alive
from dreamloom.rundir import RunDir
from test_jobs import recipe, start_worker, wait_until


def test_a_worker_that_stops_renewing_loses_its_job_and_its_trainer_is_stopped(tmp_path, subject_dir):
    queue = JobQueue(tmp_path / "home")
    job = queue.submit(recipe(subject_dir, []), tmp_path / "runs")
    hung_worker = 999_999_999  # a worker that claimed it, then froze
    assert queue.claim(hung_worker, lease=0.2).id == job
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    os.kill(trainer.pid, signal.SIGSTOP)  # frozen too: it must still be stopped
    queue.update(job, trainer_pid=trainer.pid)
    assert queue.claim(os.getpid()) is None  # its lease still holds
    time.sleep(0.3)
    taken = queue.claim(os.getpid())
    assert (taken.id, taken.attempts, taken.worker_pid) == (job, 2, os.getpid())
    trainer.wait(timeout=15)
    assert not pid_alive(trainer.pid)
    assert not queue.renew(job, hung_worker)  # the frozen worker, waking up, learns it lost the job
    assert queue.renew(job, os.getpid())


def test_retries_back_off_and_stop_at_the_limit(tmp_path, subject_dir):
    queue = JobQueue(tmp_path / "home")
    job = queue.submit(recipe(subject_dir, []), tmp_path / "runs")
    ahead = queue.submit(recipe(subject_dir, []), tmp_path / "runs")
    assert queue.waiting_reason(queue.get(ahead)) == "1 queued ahead"
    for attempt in (1, 2):
        claimed = queue.claim(os.getpid())
        assert (claimed.id, claimed.attempts) == (job, attempt)
        assert queue.retry_or_fail(claimed, "Segmentation fault", max_attempts=3, backoff=100) == "queued"
        waiting = queue.get(job)
        assert waiting.not_before - time.time() == pytest.approx(100 * 2 ** (attempt - 1), abs=5)
        assert queue.waiting_reason(waiting).startswith(f"retry {attempt + 1} in ")
        assert f"attempt {attempt} of 3 failed" in waiting.error
        assert queue.claim(os.getpid()).id == ahead  # the other job goes first meanwhile
        queue.finish(ahead, "finished")
        ahead = queue.submit(recipe(subject_dir, []), tmp_path / "runs")
        queue.update(job, not_before=time.time() - 1)  # the backoff is over
    last = queue.claim(os.getpid())
    assert last.attempts == 3
    assert queue.retry_or_fail(last, "Segmentation fault", max_attempts=3) == "failed"
    assert queue.get(job).error == "failed 3 time(s); the last error: Segmentation fault"


def test_bad_input_fails_at_once_and_is_not_retried(tmp_path):
    queue = JobQueue(tmp_path / "home")
    job = queue.submit_command("try", ["sample", "--base", str(tmp_path / "no-such-model"), "--prompt", "x",
                                       "--out", str(tmp_path / "o.png")])
    from dreamloom.jobs.worker import Policy, run_worker

    run_worker(queue.home, once=True, policy=Policy(backoff=0))
    done = queue.get(job)
    assert (done.state, done.attempts) == ("failed", 1) and "no-such-model" in done.error


def test_a_stopped_trainer_loses_its_job_which_resumes_and_finishes(tmp_path, subject_dir, cli_env, capsys):
    queue = JobQueue(tmp_path / "home")
    job = queue.submit(recipe(subject_dir, ["train.steps=300", "train.checkpoint_every=10", "sample.steps=2",
                                            "sample.images_per_prompt=1"]), tmp_path / "runs")
    worker = start_worker(queue.home, cli_env, "--hang-timeout", "4", "--backoff", "0")
    try:
        wait_until(lambda: queue.get(job).run_dir and RunDir.open(queue.get(job).run_dir).checkpoint_steps(),
                   what="a checkpoint")
        stopped = queue.get(job).trainer_pid
        os.kill(stopped, signal.SIGSTOP)  # hung, not dead: its heartbeat falls silent
        wait_until(lambda: queue.get(job).attempts == 2, timeout=60, what="the hung trainer to lose its job")
        assert main(["jobs", "list", "--home", str(queue.home)]) == 0
        wait_until(lambda: queue.get(job).state == "finished", timeout=300, what="the resumed job")
    finally:
        worker.kill()
        worker.wait()
    assert not pid_alive(stopped)
    log = (queue.home / "logs" / f"job-{job}.log").read_text()
    assert "stopped as hung" in log and "(attempt 2)" in log
    run = RunDir.open(queue.get(job).run_dir)
    starts = [e for e in run.events() if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"] > 0  # resumed from its checkpoint
    assert [e["event"] for e in run.events()].count("end") == 1


def test_a_queue_from_a_newer_dreamloom_is_refused_and_left_alone(tmp_path, capsys):
    home = tmp_path / "home"
    JobQueue(home)
    with sqlite3.connect(home / "jobs.db") as db:
        db.execute("PRAGMA user_version = 99")
    before = (home / "jobs.db").read_bytes()
    with pytest.raises(DreamloomError, match="newer dreamloom"):
        JobQueue(home)
    assert main(["jobs", "list", "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert str(home / "jobs.db") in err and "upgrade dreamloom" in err and "Traceback" not in err
    assert (home / "jobs.db").read_bytes() == before and not list(home.glob("jobs.db.*"))
