"""The queue on a Ray cluster (`jobs worker --ray`): a local cluster of two CPU-only nodes on
this machine (a head and a second node), four jobs at once through the real CLI. Every job ends once;
a Ray worker killed mid-run costs only the steps since the checkpoint (Ray Train's failure policy
restarts it, and the run resumes to the weights of an uninterrupted run); a cancel from the CLI
reaches the Ray workers and leaves a checkpoint; a job of two processes runs as two Ray Train
workers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.cluster_utils import Cluster
from safetensors.torch import load_file

from dreamloom.jobs.queue import JobQueue
from dreamloom.rundir import RunDir

STEPS, EVERY = 30, 10
SETS = [f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.keep_checkpoints=5"]


@pytest.fixture(scope="module")
def cluster():
    nodes = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2, "include_dashboard": False})
    nodes.add_node(num_cpus=2)
    nodes.wait_for_nodes()
    yield nodes
    nodes.shutdown()


def submit(home: Path, subject_dir: Path, env: dict, *extra: str) -> None:
    done = subprocess.run([sys.executable, "-m", "dreamloom", "jobs", "submit", "--home", str(home), "--recipe",
                           "tiny-lora", "--data", str(subject_dir), "--class-word", "star", *extra],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def events(run_dir: str | None) -> list[dict]:
    return RunDir.open(run_dir).events() if run_dir and (Path(run_dir) / "run.json").is_file() else []


def ray_worker_pid(log: Path) -> int | None:
    found = re.findall(r"--- ray worker (\d+) on .*: rank 0 ", log.read_text()) if log.is_file() else []
    return int(found[-1]) if found else None


def test_the_queue_runs_on_a_ray_cluster(cluster, tmp_path, subject_dir, cli_env):
    home = tmp_path / "home"
    for _ in range(2):  # job 1 is killed mid-run, job 2 is its uninterrupted twin
        submit(home, subject_dir, cli_env, *(f"--set={s}" for s in SETS))
    submit(home, subject_dir, cli_env, "--gpus", "2", *(f"--set={s}" for s in SETS))  # job 3: two Ray workers
    submit(home, subject_dir, cli_env, "--set=train.steps=100000", f"--set=train.checkpoint_every={EVERY}")  # job 4
    worker = subprocess.Popen([sys.executable, "-m", "dreamloom", "jobs", "worker", "--home", str(home),
                               "--ray", cluster.address, "--once", "--backoff", "0"], env=cli_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    queue, killed, cancelled = JobQueue(home), None, False
    deadline = time.time() + 600
    while (killed is None or not cancelled) and time.time() < deadline and worker.poll() is None:
        if killed is None and any(e["event"] == "checkpoint" and e["step"] == EVERY for e in events(queue.get(1).run_dir)):
            killed = ray_worker_pid(home / "logs" / "job-1.log")
            os.kill(killed, signal.SIGKILL)  # the Ray Train worker training job 1, mid-run
        if not cancelled and any(e["event"] == "checkpoint" for e in events(queue.get(4).run_dir)):
            done = subprocess.run([sys.executable, "-m", "dreamloom", "jobs", "cancel", "4", "--home", str(home)],
                                  env=cli_env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            cancelled = True
        time.sleep(0.2)
    output, _ = worker.communicate(timeout=600)
    assert worker.returncode == 0 and killed and cancelled, output

    jobs = {job.id: job for job in queue.jobs()}
    assert [jobs[i].state for i in range(1, 5)] == ["finished"] * 3 + ["cancelled"], output
    assert all(jobs[i].attempts == 1 for i in range(1, 5))  # the kill was Ray's to handle: no retry of the queue's
    for i in range(1, 4):
        run_events = events(jobs[i].run_dir)
        assert [e["event"] for e in run_events].count("end") == 1  # finished exactly once
        assert [e["resumed_from"] for e in run_events if e["event"] == "start"] == ([0, EVERY] if i == 1 else [0])
    killed_run, uninterrupted = (load_file(Path(jobs[i].run_dir) / "exports" / "sks-lora.safetensors") for i in (1, 2))
    assert max((killed_run[k] - uninterrupted[k]).abs().max().item() for k in killed_run) < 1e-6
    log = (home / "logs" / "job-3.log").read_text()
    assert "rank 0 of 2" in log and "rank 1 of 2" in log
    stopped = RunDir.open(jobs[4].run_dir)
    assert stopped.stopped() and stopped.checkpoint_steps()[-1] >= EVERY  # stopped with a checkpoint
