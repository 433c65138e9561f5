"""The job queue's record stays true: a job rerun after losing its worker and trainer trains in the
run directory it already has; a damaged or emptied jobs.db is said so, kept aside, and the list of
runs rebuilt from the run directories."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from dreamloom.cli import main
from dreamloom.rundir import RunDir
from dreamloom.jobs.queue import JobQueue
from dreamloom.jobs.worker import job_run
from dreamloom.recipes import resolve_recipe


def recipe(subject_dir, sets=()):
    return resolve_recipe("tiny-lora", ["train.steps=6", *sets], {"data.path": str(subject_dir),
                                                                  "data.class_word": "star"})


def test_a_job_killed_before_its_first_checkpoint_finishes_in_its_own_run_dir(tmp_path, subject_dir, cli_env):
    queue = JobQueue(tmp_path / "home")
    job_id = queue.submit(recipe(subject_dir), tmp_path / "runs")
    # A worker claimed it and made its run directory; then worker and trainer were both killed
    # (pid 2**22 + 1 is above Linux's pid_max: a process that cannot exist).
    job = queue.claim(2**22 + 1)
    first = job_run(queue, job)
    first.log("start", steps=6, resumed_from=0)  # the trainer got this far
    worker = subprocess.run([sys.executable, "-m", "dreamloom", "jobs", "worker", "--home", str(queue.home), "--once"],
                            env=cli_env, capture_output=True, text=True, timeout=300)
    assert "queued again" in worker.stdout, worker.stdout + worker.stderr
    job = queue.get(job_id)
    assert job.state == "finished", worker.stdout
    assert job.run_dir == str(first.path) and list((tmp_path / "runs").iterdir()) == [first.path]
    run = RunDir.open(job.run_dir)
    assert run.is_finished() and any(run.exports.iterdir())


def test_workers_starting_jobs_at_one_instant_get_a_run_directory_each(tmp_path, subject_dir):
    """A Ray worker starts several jobs at once (a local worker per GPU can too): each gets its own."""
    same, start, made = recipe(subject_dir), threading.Barrier(6), []

    def make():
        start.wait()
        made.append(RunDir.create(tmp_path / "runs", same).path)
    threads = [threading.Thread(target=make) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 6 and all((path / "run.json").is_file() for path in made)


def finished_and_unfinished_runs(home, subject_dir):
    """Two run directories as the queue left them: one finished, one stopped with a checkpoint."""
    runs = home / "runs"
    done = RunDir.create(runs, recipe(subject_dir))
    done.log("start", steps=6)
    done.log("end", step=6)
    stopped = RunDir.create(runs, recipe(subject_dir, ["train.seed=1"]))
    stopped.log("start", steps=6)
    stopped.log("stopped", message="stopped at step 3")
    return done, stopped


@pytest.mark.parametrize("damage", ["emptied", "truncated", "junk header"])
def test_a_damaged_queue_is_kept_aside_and_rebuilt_from_the_runs(damage, tmp_path, subject_dir, capsys):
    home = tmp_path / "home"
    queue = JobQueue(home)
    done, stopped = finished_and_unfinished_runs(home, subject_dir)
    for run in (done, stopped):
        queue.submit(run.recipe(), home / "runs")
    original = queue.path.read_bytes()
    damaged = {"emptied": b"", "truncated": original[:100], "junk header": b"not sqlite at all" + original[17:]}[damage]
    queue.path.write_bytes(damaged)
    for suffix in ("-wal", "-shm"):
        (home / f"jobs.db{suffix}").unlink(missing_ok=True)

    assert main(["jobs", "list", "--home", str(home)]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "jobs.db" in err and "damaged" in err and "kept as jobs.db.damaged-" in err, err
    assert "2 run(s)" in err
    (aside,) = home.glob("jobs.db.damaged-*")
    assert aside.read_bytes() == damaged  # the damaged file is kept as it was
    assert str(done.path) in out and str(stopped.path) in out
    jobs = {j.run_dir: j for j in JobQueue(home).jobs()}
    assert jobs[str(done.path)].state == "finished" and jobs[str(stopped.path)].state == "cancelled"
    queue = JobQueue(home)
    queue.requeue(jobs[str(stopped.path)].id)  # the unfinished one can be resumed
    assert queue.get(jobs[str(stopped.path)].id).state == "queued"
    assert queue.notices()[0].startswith("the job queue")  # what the studio's Jobs page shows
    assert main(["jobs", "list", "--home", str(home)]) == 0 and capsys.readouterr().err == ""  # once only


def test_the_worker_also_survives_a_damaged_queue(tmp_path, cli_env):
    home = tmp_path / "home"
    JobQueue(home)
    (home / "jobs.db").write_bytes(b"\0" * 100)
    worker = subprocess.run([sys.executable, "-m", "dreamloom", "jobs", "worker", "--home", str(home), "--once"],
                            env=cli_env, capture_output=True, text=True, timeout=120)
    assert worker.returncode == 0 and "damaged" in worker.stderr and "Traceback" not in worker.stderr
