"""The job queue and its workers, as real processes: ordering, cancel with a checkpoint, resume,
recovery after the worker is killed, and no job ever taken twice."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from dreamloom.cli import main
from dreamloom.rundir import RunDir
from dreamloom.jobs.queue import JobQueue
from dreamloom.recipes import resolve_recipe

LONG = ["train.steps=400", "train.checkpoint_every=10", "sample.steps=2", "sample.images_per_prompt=1"]


def recipe(subject_dir, sets):
    return resolve_recipe("tiny-lora", sets, {"data.path": str(subject_dir), "data.class_word": "star"})


def start_worker(home, cli_env, *extra):
    return subprocess.Popen([sys.executable, "-m", "dreamloom", "jobs", "worker", "--home", str(home), *extra],
                            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until(check, timeout=180.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def checkpointed(queue, job_id):
    job = queue.get(job_id)
    return job.run_dir and RunDir.open(job.run_dir).checkpoint_steps()


def test_queue_order_cancel_and_resume(tmp_path, subject_dir, cli_env):
    queue = JobQueue(tmp_path / "home")
    first = queue.submit(recipe(subject_dir, LONG), tmp_path / "runs")
    second = queue.submit(recipe(subject_dir, ["train.steps=5"]), tmp_path / "runs")
    worker = start_worker(queue.home, cli_env)
    try:
        wait_until(lambda: checkpointed(queue, first), what="the first job's checkpoint")
        assert queue.get(second).state == "queued"  # one job at a time per device
        assert queue.cancel(first) == "cancelling"
        wait_until(lambda: queue.get(first).state == "cancelled", what="the cancel")
        run = RunDir.open(queue.get(first).run_dir)
        assert run.events()[-1]["event"] == "stopped" and run.checkpoint_steps()  # checkpointed first
        wait_until(lambda: queue.get(second).state == "finished", what="the second job")

        queue.requeue(first)
        wait_until(lambda: queue.get(first).state == "finished", timeout=300, what="the resumed job")
    finally:
        worker.kill()
        worker.wait()
    starts = [e for e in run.events() if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"] > 0
    assert run.events()[-1]["event"] == "end"


def test_killed_worker_job_resumes_from_checkpoint(tmp_path, subject_dir, cli_env):
    queue = JobQueue(tmp_path / "home")
    job = queue.submit(recipe(subject_dir, LONG), tmp_path / "runs")
    worker = start_worker(queue.home, cli_env)
    wait_until(lambda: checkpointed(queue, job), what="a checkpoint")
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    assert queue.get(job).state == "running"  # nobody told the queue

    restarted = start_worker(queue.home, cli_env, "--once")
    out, _ = restarted.communicate(timeout=300)
    assert "queued again" in out, out
    assert queue.get(job).state == "finished", out
    run = RunDir.open(queue.get(job).run_dir)
    starts = [e for e in run.events() if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"] > 0  # resumed, not restarted
    assert [e["event"] for e in run.events()].count("end") == 1
    assert len(list((tmp_path / "runs").iterdir())) == 1  # one run directory


def test_cancel_a_queued_job(tmp_path, subject_dir):
    queue = JobQueue(tmp_path / "home")
    job = queue.submit(recipe(subject_dir, []), tmp_path / "runs")
    assert queue.cancel(job) == "cancelled"
    assert queue.claim(os.getpid()) is None
    with pytest.raises(Exception, match="only queued or running"):
        queue.cancel(job)


def _claim_all(home, results):
    queue = JobQueue(home)
    while (job := queue.claim(os.getpid())) is not None:
        results.put(job.id)


def test_two_workers_never_take_the_same_job(tmp_path, subject_dir):
    queue = JobQueue(tmp_path / "home")
    ids = [queue.submit(recipe(subject_dir, []), tmp_path / "runs") for _ in range(40)]
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    workers = [ctx.Process(target=_claim_all, args=(queue.home, results)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    claimed = [results.get(timeout=5) for _ in range(len(ids))]
    assert sorted(claimed) == ids and results.empty()


def test_jobs_cli(tmp_path, subject_dir, capsys):
    home = ["--home", str(tmp_path / "home")]
    assert main(["jobs", "submit", "--recipe", "tiny-lora", "--data", str(subject_dir), *home]) == 0
    assert "job 1 queued" in capsys.readouterr().out
    assert main(["jobs", "list", *home]) == 0
    assert "queued" in capsys.readouterr().out
    assert main(["jobs", "cancel", "1", *home]) == 0
    assert main(["jobs", "logs", "1", *home]) == 0
    assert main(["jobs", "submit", "--recipe", "tiny-lora", "--data", str(tmp_path / "nothing"), *home]) == 2
    assert "nothing" in capsys.readouterr().err
    assert len(JobQueue(tmp_path / "home").jobs()) == 1  # the bad submission queued nothing
