"""A full fine-tune sharded across processes (train.strategy = full_shard, FSDP), here 2 CPU processes over gloo:
each holds half the trained weights and trains exactly what DDP trains, a stopped run resumes to the weights of an
uninterrupted one (the optimizer state is checkpointed whole and split again), and `dreamloom estimate` counts the
shard each process really holds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreamloom.estimate import estimate
from dreamloom.recipes import resolve_recipe
from helpers import largest_difference

SETS = ["train.steps=16", "train.checkpoint_every=8", "train.batch_size=1", "train.processes=2", "sample.steps=2",
        "sample.images_per_prompt=1", "prior.enabled=false", "train.log_every=4"]  # a stop is agreed on every 4 steps


def start_train(out: Path, subject_dir, cli_env, *sets) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dreamloom", "train", "tiny-dreambooth", "--data", str(subject_dir),
                             "--class-word", "star", "--out", str(out), *(f"--set={s}" for s in [*SETS, *sets])],
                            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def trained(out: Path, subject_dir, cli_env, *sets) -> Path:
    proc = start_train(out, subject_dir, cli_env, *sets)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    return next(p for p in out.iterdir() if p.is_dir())


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "exports" / "sks-dreambooth.safetensors")


@pytest.fixture(scope="module")
def full_shard(tmp_path_factory, subject_dir, cli_env) -> Path:
    return trained(tmp_path_factory.mktemp("full-shard"), subject_dir, cli_env, "train.strategy='full_shard'")


def test_each_process_holds_half_and_trains_what_ddp_trains(full_shard, tmp_path, subject_dir, cli_env):
    ddp = trained(tmp_path / "ddp", subject_dir, cli_env, "train.channels_last=false")  # sharded weights stay NCHW
    ours, theirs = (next(e for e in events(r) if e["event"] == "start") for r in (full_shard, ddp))
    assert ours["strategy"] == "full_shard" and theirs["strategy"] == "ddp"
    assert ours["trained_bytes_per_process"] == theirs["trained_bytes_per_process"] // 2  # the tiny UNet's dims are even
    # the same batches and noise; only the order of float sums differs (2e-6 after 16 Adam steps at lr 1e-3)
    assert largest_difference(weights(full_shard), weights(ddp)) < 2e-5
    assert (full_shard / "exports" / "diffusers" / "unet").is_dir()  # the whole model, gathered on the main process
    est = estimate(resolve_recipe("tiny-dreambooth", [*SETS, "train.strategy='full_shard'"]), "tiny")
    assert est.shardable.share("unet", 2) == ours["trained_bytes_per_process"]
    ddp_peak = est.sharded("ddp", 2).allocated
    assert est.allocated < est.sharded("shard_grad_op", 2).allocated < ddp_peak


def test_a_stopped_sharded_run_resumes_to_the_uninterrupted_weights(full_shard, tmp_path, subject_dir, cli_env):
    out = tmp_path / "stopped"
    proc = start_train(out, subject_dir, cli_env, "train.strategy='full_shard'")
    deadline, run = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:  # stop it (as a cancel does) once it trains
        run = next((p for p in out.iterdir() if p.is_dir()), None) if out.is_dir() else None
        if run and (run / "events.jsonl").is_file() and any(e["event"] == "step" for e in events(run)):
            (run / "stop-requested").touch()
            break
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=600)
    stopped = [e for e in events(run) if e["event"] == "stopped"]
    assert stopped and proc.returncode != 0, output[-3000:]
    (run / "stop-requested").unlink()
    resumed = subprocess.run([sys.executable, "-m", "dreamloom", "train", "--resume", str(run)], env=cli_env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    starts = [e for e in events(run) if e["event"] == "start"]
    assert len(starts) == 2 and 0 < starts[1]["resumed_from"] < 16
    assert largest_difference(weights(run), weights(full_shard)) < 1e-6
