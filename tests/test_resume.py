"""A run killed with SIGKILL after a checkpoint resumes to exactly the weights of a run that
was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from dreamloom.rundir import RunDir
from dreamloom.trainers.run import resume_run
from helpers import train_tiny, write_shaped_images

COMMON = ["train.steps=150", "train.checkpoint_every=10", "train.keep_checkpoints=3"]
CASES = {
    "lora": ("tiny-lora", COMMON + ["lora.dropout=0.1"]),
    "dreambooth-prior-ema": ("tiny-dreambooth", COMMON + ["train.ema=true", "train.ema_on_cpu=true"]),
    # ReLU and Dropout shift A1111's layer numbering; the dropout's randomness must resume exactly too
    "hypernetwork-dropout": ("tiny-hypernetwork", COMMON + ["hypernetwork.layer_structure=[1,2,2,1]",
                                                            "hypernetwork.activation='relu'", "hypernetwork.dropout=true"]),
    "textual-inversion": ("tiny-ti", COMMON),  # the object templates are drawn per step: they must resume too
    "pivotal": ("tiny-pivotal", COMMON),
    "locon": ("tiny-locon", COMMON + ["lora.dropout=0.1"]),
    "loha": ("tiny-loha", COMMON + ["lora.dropout=0.1"]),  # LyCORIS's own dropout must replay too
    "lokr": ("tiny-lokr", COMMON),
    "dora": ("tiny-dora", COMMON),
    "sdxl-lora-both-text-encoders": ("tiny-xl-lora", COMMON + ["lora.train_text_encoder=true"]),
    "sdxl-ti": ("tiny-xl-ti", COMMON),  # one vector set per text encoder
    # buckets of three shapes, masks and shuffled, dropped-out tags: every draw must replay
    "lora-buckets-masks-tags": ("tiny-lora", COMMON + [
        "data.buckets=true", "data.bucket_step=16", "data.masked_loss=true", "data.shuffle_tags=true",
        "data.keep_tokens=1", "data.tag_dropout=0.2", "train.batch_size=2", "data.min_image_size=32"]),
}
SHAPED = {"lora-buckets-masks-tags"}  # trained on write_shaped_images' pictures


def wait_for_checkpoint(out, proc, timeout=120.0) -> RunDir:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for events in out.glob("*/events.jsonl"):
            if any(json.loads(line)["event"] == "checkpoint" for line in events.read_text().splitlines() if line.strip()):
                return RunDir(events.parent)
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.parametrize("case", CASES)
def test_resume_after_sigkill_matches_uninterrupted_run(case, tmp_path, subject_dir, cli_env):
    recipe, sets = CASES[case]
    if case in SHAPED:
        subject_dir = write_shaped_images(tmp_path / "shaped")
    out = tmp_path / "killed"
    cmd = ["dreamloom", "train", recipe, "--data", str(subject_dir), "--class-word", "star", "--out", str(out)]
    proc = subprocess.Popen(cmd + [a for s in sets for a in ("--set", s)], env=cli_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = wait_for_checkpoint(out, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not any(e["event"] == "end" for e in run.events()), "the run finished before it was killed"
    killed_at = run.checkpoint_steps()[-1]
    assert 10 <= killed_at < 150

    resume_run(run.path)
    events = run.events()
    assert [e["resumed_from"] for e in events if e["event"] == "start"] == [0, killed_at]
    assert events[-1]["event"] == "end"

    reference, _, _ = train_tiny(tmp_path / "straight", subject_dir, sets, recipe=recipe)
    resumed = load_file(run.latest_checkpoint() / "trainable.safetensors")
    straight = load_file(reference.latest_checkpoint() / "trainable.safetensors")
    assert resumed.keys() == straight.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)
    if "ema" in case:  # the EMA copy resumes too: it is what gets exported
        ema = [load_file(r.latest_checkpoint() / "ema.safetensors") for r in (run, reference)]
        assert ema[0].keys() == straight.keys()
        for key in straight:
            torch.testing.assert_close(ema[0][key], ema[1][key], rtol=0, atol=1e-6, msg=key)
        assert any(not torch.equal(ema[0][k], resumed[k]) for k in straight)  # an average, not a copy
