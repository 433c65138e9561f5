"""One run on several processes (train.processes), as `accelerate launch` starts it for several
GPUs, here on the CPU over gloo: the same weights as one process on the same global batch, one
record of the run, and a killed process costs only the steps since the last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreamloom.jobs.queue import JobQueue
from helpers import largest_difference, train_tiny

STEPS, EVERY = 120, 40
SETS = [f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.batch_size=1", "train.keep_checkpoints=5",
        "train.log_every=1"]


def export(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "exports" / "sks-lora.safetensors")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, subject_dir, cli_env) -> Path:
    """tiny-lora trained by `dreamloom train` on 2 processes of batch 1, uninterrupted."""
    out = tmp_path_factory.mktemp("two")
    done = subprocess.run([sys.executable, "-m", "dreamloom", "train", "tiny-lora", "--data", str(subject_dir), "--class-word", "star",
                           "--out", str(out), "--set", "train.processes=2", *(f"--set={s}" for s in SETS)],
                          env=cli_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("finished:") == 1  # the main process speaks for both
    return next(p for p in out.iterdir() if p.is_dir())


def test_two_processes_train_what_one_process_trains_on_their_global_batch(two_processes, tmp_path, subject_dir):
    run, _, _ = train_tiny(tmp_path, subject_dir, [*SETS, "train.batch_size=2"])
    # the same batches, noise and timesteps; only the order of float sums differs, which 120 Adam steps at
    # lr 3e-3 grow to about 3e-4 on weights of about 0.1-0.4 (after 4 steps the two agree to 2e-6)
    assert largest_difference(export(run.path), export(two_processes)) < 1e-3
    events = [json.loads(line)["event"] for line in (two_processes / "events.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events.count("end") == 1 and events.count("step") == STEPS
    steps = [json.loads(line) for line in (two_processes / "events.jsonl").read_text().splitlines()]
    ours = [e["loss"] for e in steps if e["event"] == "step"]
    theirs = [e["loss"] for e in run.events() if e["event"] == "step"]
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-3  # the logged loss is the whole batch's


def rank_pid(run: Path, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or str(run) not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"dreamloom.trainers" in (proc / "cmdline").read_bytes():
            return int(proc.name)
    return None


def test_a_killed_process_stops_the_job_which_resumes_to_the_same_weights(two_processes, tmp_path, subject_dir,
                                                                           cli_env):
    home = tmp_path / "home"
    submit = subprocess.run([sys.executable, "-m", "dreamloom", "jobs", "submit", "--home", str(home), "--recipe",
                             "tiny-lora", "--data", str(subject_dir), "--class-word", "star", "--gpus", "2", *(f"--set={s}" for s in SETS)],
                            env=cli_env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stderr
    worker = subprocess.Popen([sys.executable, "-m", "dreamloom", "jobs", "worker", "--home", str(home), "--once",
                               "--backoff", "0"], env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    queue, killed = JobQueue(home), None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline:
        run_dir = queue.get(1).run_dir
        if run_dir and (Path(run_dir) / "checkpoints" / f"step-{EVERY:08d}").is_dir():
            killed = rank_pid(Path(run_dir), 1)
            if killed:
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    output, _ = worker.communicate(timeout=600)
    assert killed is not None, output
    job = queue.get(1)
    assert job.state == "finished" and job.attempts == 2, output
    run = Path(job.run_dir)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "start" and e["resumed_from"] >= EVERY for e in events)
    assert largest_difference(export(run), export(two_processes)) < 1e-6
