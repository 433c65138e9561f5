"""How a run's trainer starts: `python -m dreamloom.trainers RUN`, or, for a run of several
processes (train.processes), the same module under `accelerate launch`, one process per GPU the
caller owns (CUDA_VISIBLE_DEVICES); on a machine without GPUs, CPU processes over gloo."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A port for the processes' rendezvous: two runs on one machine must not share one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_command(run_path: str | Path, processes: int) -> list[str]:
    module = ["-m", "dreamloom.trainers", str(run_path)]
    if processes == 1:
        return [sys.executable, *module]
    # the recipe sets the precision; torchrun's agent watches its processes every second, and when
    # one dies it stops the others (the run then resumes from its last checkpoint)
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", "--monitor_interval", "1", *module]


def train_in_processes(run_path: str | Path, processes: int) -> int:
    """Train the run in `processes` processes from this one (`dreamloom train` of such a recipe);
    their exit code. Ctrl-C reaches them too: they checkpoint and stop together."""
    proc = subprocess.Popen(trainer_command(run_path, processes))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return proc.wait()
