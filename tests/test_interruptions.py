"""A run stopped from outside (Ctrl-C, a full disk) says so in one line, keeps what it made resumable,
and leaves nothing half-made: no run directory without a checkpoint, no half-written checkpoint."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import time

from dreamloom.cli import main
from dreamloom.rundir import RunDir
from dreamloom.trainers import loop
from dreamloom.trainers.run import resume_run


def train_args(data, out, *sets):
    return ["train", "tiny-lora", "--data", str(data), "--out", str(out), "--set", "train.checkpoint_every=5",
            *[a for s in sets for a in ("--set", s)]]


def failing_save(monkeypatch, fail_at: int):
    """save_checkpoint as the loop calls it, but the checkpoint at step `fail_at` meets a full disk
    halfway through (its temp folder is already there)."""
    real = loop.save_checkpoint

    def save(accelerator, run, step, keep):
        if step == fail_at:
            (run.checkpoints / f".tmp-step-{step:08d}").mkdir(parents=True)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(accelerator, run, step, keep)
    monkeypatch.setattr(loop, "save_checkpoint", save)


def test_full_disk_mid_run_keeps_the_run_resumable(tmp_path, subject_dir, capsys, monkeypatch):
    out = tmp_path / "runs"
    failing_save(monkeypatch, fail_at=10)
    assert main(train_args(subject_dir, out, "train.steps=20")) == 2
    err = capsys.readouterr().err
    (run_path,) = out.iterdir()
    (line,) = [line for line in err.splitlines() if "error" in line]  # one line (besides the progress bar)
    assert "no space left" in line and str(run_path) in line and "free" in line, err
    assert "--resume" in err and "Traceback" not in err
    run = RunDir.open(run_path)
    assert run.checkpoint_steps() == [5] and not list(run.checkpoints.glob(".tmp-*"))

    monkeypatch.undo()  # space was freed
    resume_run(run.path)
    assert run.is_finished() and run.checkpoint_steps()[-1] == 20


def test_full_disk_before_the_first_checkpoint_leaves_no_run(tmp_path, subject_dir, capsys, monkeypatch):
    out = tmp_path / "runs"
    failing_save(monkeypatch, fail_at=5)
    assert main(train_args(subject_dir, out, "train.steps=20")) == 2
    assert "no space left" in capsys.readouterr().err
    assert not any(out.iterdir())


def test_ctrl_c_checkpoints_and_stops_like_a_cancel(tmp_path, subject_dir, cli_env):
    out = tmp_path / "runs"
    proc = subprocess.Popen(["dreamloom", *train_args(subject_dir, out, "train.steps=400")], env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any('"event": "step"' in p.read_text() for p in out.glob("*/events.jsonl")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    (run_path,) = out.iterdir()
    run = RunDir.open(run_path)
    stopped = [e for e in run.events() if e["event"] == "stopped"]
    assert stopped and run.checkpoint_steps() and run.checkpoint_steps()[-1] < 400
    assert f"dreamloom train --resume {run.path}" in err
    assert json.loads((run.latest_checkpoint() / "progress.json").read_text())["step"] == run.checkpoint_steps()[-1]


def test_ctrl_c_before_training_starts_is_one_line(tmp_path, subject_dir, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("dreamloom.trainers.run.load_recipe_base", interrupted)
    assert main(train_args(subject_dir, tmp_path / "runs", "train.steps=5")) == 130
    assert capsys.readouterr().err.strip() == "interrupted."
    assert not (tmp_path / "runs").exists()

