"""`make soak`: the queue under fire. Several workers on one queue of identical tiny jobs, while
trainers and workers are SIGKILLed at random (a killed worker is replaced, as a supervisor would);
at the end every job must be finished exactly once (one `end` event in its run) with the weights
of one uninterrupted run. Minutes of CPU, so not part of `make test`; BENCHMARKS.md has its figures.

    .venv/bin/python tools/soak.py [--jobs 30] [--workers 3] [--kills 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from dreamloom.jobs.queue import JobQueue

DREAMLOOM = [sys.executable, "-m", "dreamloom"]
SETS = ["train.steps=12", "train.checkpoint_every=4", "train.keep_checkpoints=5"]


def start_worker(home: Path, log) -> subprocess.Popen:
    # retries: a job may be hit several times at random; backoff 0 keeps the soak short
    return subprocess.Popen([*DREAMLOOM, "jobs", "worker", "--home", str(home), "--backoff", "0", "--retries", "50"],
                            stdout=log, stderr=subprocess.STDOUT)


def weights(run: Path) -> dict:
    return load_file(run / "exports" / "sks-lora.safetensors")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="working folder (default: a new temporary one)")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="dreamloom-soak-"))
    data, home = work / "pictures", work / "home"
    sets = [f"--set={s}" for s in SETS]
    subprocess.run([*DREAMLOOM, "toy", "data", "--out", str(data), "--count", "4"], check=True, capture_output=True)
    began = time.time()
    subprocess.run([*DREAMLOOM, "train", "tiny-lora", "--data", str(data), "--class-word", "star", "--out",
                    str(work / "reference"), *sets], check=True, capture_output=True)
    reference = weights(next((work / "reference").iterdir()))
    for _ in range(args.jobs):
        subprocess.run([*DREAMLOOM, "jobs", "submit", "--home", str(home), "--recipe", "tiny-lora", "--data", str(data),
                        "--class-word", "star", *sets], check=True, capture_output=True)
    rng, queue, log = random.Random(args.seed), JobQueue(home), open(work / "workers.log", "a")
    workers = [start_worker(home, log) for _ in range(args.workers)]
    killed = {"trainer": 0, "worker": 0}
    deadline = time.time() + 60 * 60
    while any(j.state in ("queued", "running") for j in queue.jobs()):
        if time.time() > deadline:
            print("soak: the queue did not drain within an hour", file=sys.stderr)
            return 1
        time.sleep(rng.uniform(0.5, 3.0))
        if sum(killed.values()) >= args.kills:
            continue
        trainers = [j.trainer_pid for j in queue.jobs() if j.state == "running" and j.trainer_pid]
        if trainers and rng.random() < 0.75:
            try:
                os.kill(rng.choice(trainers), signal.SIGKILL)
                killed["trainer"] += 1
            except ProcessLookupError:
                pass
        else:
            victim = rng.randrange(len(workers))
            workers[victim].kill()
            workers[victim].wait()  # reaped: a zombie would still count as a live worker
            killed["worker"] += 1
            workers[victim] = start_worker(home, log)  # it takes back the dead worker's job first
    for worker in workers:
        worker.terminate()
        worker.wait()

    problems = []
    for job in queue.jobs():
        run = Path(job.run_dir) if job.run_dir else None
        ends = [json.loads(line)["event"] for line in (run / "events.jsonl").read_text().splitlines()].count("end") \
            if run else 0
        if job.state != "finished" or ends != 1:
            problems.append(f"job {job.id}: {job.state}, {ends} end event(s), {job.error or ''}")
            continue
        ours = weights(run)
        difference = max((ours[k] - reference[k]).abs().max().item() for k in reference)
        if difference > 1e-6:
            problems.append(f"job {job.id}: weights differ from the uninterrupted run by {difference:.2e}")
    starts = sum(j.attempts for j in queue.jobs())
    print(f"soak: {args.jobs} jobs, {args.workers} workers, {killed['trainer']} trainers and {killed['worker']} "
          f"workers SIGKILLed, {starts} starts in all, {time.time() - began:.0f} s; "
          + ("every job finished once with the uninterrupted weights" if not problems else "PROBLEMS:"))
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
