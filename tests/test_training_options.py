"""Every training option the recipe offers runs through the real loop and does what it says."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from dreamloom.errors import DreamloomError
from dreamloom.rundir import RunDir
from dreamloom.trainers.lora import LoraMethod
from dreamloom.trainers.parts import unwrapped
from dreamloom.trainers.__main__ import main as trainers_main
from helpers import train_tiny

SHORT = ["train.steps=4", "train.checkpoint_every=0", "train.sample_every=0", "sample.images_per_prompt=1",
         "sample.steps=2", "train.log_every=1"]


@pytest.mark.parametrize("sets", [
    ["train.optimizer='adamw8bit'"],
    ["train.optimizer='prodigy'", "train.learning_rate=1.0"],
    ["train.mixed_precision='bf16'"],
    ["train.gradient_checkpointing=true", "lora.train_text_encoder=true"],
    ["train.min_snr_gamma=5.0", "train.noise_offset=0.05", "data.flip=true"],
    ["train.gradient_accumulation=2", "train.lr_scheduler='cosine'", "train.lr_warmup_steps=2"],
    ["data.cache_latents=false", "data.crop='random'"],
    ["data.hue_jitter=0.5", "data.flip=true"],
], ids=["adamw8bit", "prodigy", "bf16", "checkpointing+te", "minsnr+offset+flip", "accumulation+cosine", "uncached", "hue-jitter"])
def test_option_trains(tmp_path, subject_dir, sets):
    run, trained, exports = train_tiny(tmp_path, subject_dir, SHORT + sets)
    steps = [e for e in run.events() if e["event"] == "step"]
    assert len(steps) == 4 and all(math.isfinite(e["loss"]) for e in steps)
    weights = load_file(run.latest_checkpoint() / "trainable.safetensors")
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # it learned something
    assert all(p.exists() for p in exports)


def test_a_step_event_every_log_every_steps_holds_their_mean_loss(tmp_path, subject_dir):
    every, _, _ = train_tiny(tmp_path / "each", subject_dir, SHORT + ["train.steps=6"])
    sparse, _, _ = train_tiny(tmp_path / "sparse", subject_dir, SHORT + ["train.steps=6", "train.log_every=4"])
    losses = [e["loss"] for e in every.events() if e["event"] == "step"]
    steps = [e for e in sparse.events() if e["event"] == "step"]
    assert [e["step"] for e in steps] == [4, 6]  # and the last step's, whatever its number
    assert [e["loss"] for e in steps] == pytest.approx([sum(losses[:4]) / 4, sum(losses[4:]) / 2], rel=1e-6)


def test_a_non_finite_loss_stops_before_a_checkpoint_keeps_it(tmp_path, subject_dir):
    with pytest.raises(DreamloomError, match="the loss became"):
        train_tiny(tmp_path, subject_dir, ["train.steps=40", "train.checkpoint_every=2", "train.learning_rate=1e30"])
    (run,) = [RunDir.open(p) for p in tmp_path.iterdir() if p.is_dir()]
    for step in run.checkpoint_steps():  # what was kept holds only finite weights
        assert all(torch.isfinite(v).all() for v in load_file(run.checkpoint_dir(step) / "trainable.safetensors").values())


def test_warmup_and_schedule_reach_the_optimizer(tmp_path, subject_dir):
    run, _, _ = train_tiny(tmp_path, subject_dir, SHORT + ["train.lr_scheduler='linear'", "train.lr_warmup_steps=2",
                                                           "train.learning_rate=0.01"])
    lrs = [e["lr"] for e in run.events() if e["event"] == "step"]
    assert lrs == pytest.approx([0.0, 0.005, 0.01, 0.005])  # warms up over 2 steps, then decays


def test_gradient_accumulation_sees_more_images(tmp_path, subject_dir):
    run, _, _ = train_tiny(tmp_path, subject_dir, SHORT + ["train.gradient_accumulation=3"])
    step = next(e for e in run.events() if e["event"] == "step")
    assert step["images_s"] == pytest.approx(step["it_s"] * 2 * 3, rel=1e-2)


def test_same_seed_same_weights_different_seed_different(tmp_path, subject_dir):
    a, _, _ = train_tiny(tmp_path / "a", subject_dir, SHORT)
    b, _, _ = train_tiny(tmp_path / "b", subject_dir, SHORT)
    c, _, _ = train_tiny(tmp_path / "c", subject_dir, SHORT + ["train.seed=7"])
    wa, wb, wc = (load_file(r.latest_checkpoint() / "trainable.safetensors") for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_a_crash_is_logged_and_the_run_stays_resumable(tmp_path, subject_dir, monkeypatch):
    real_loss, calls = LoraMethod.loss, {"n": 0}

    def failing_loss(self, base, batch):
        calls["n"] += 1
        if calls["n"] == 16 + 7:  # after the 16 measuring passes, fail in step 7
            raise RuntimeError("simulated CUDA error")
        return real_loss(self, base, batch)

    monkeypatch.setattr(LoraMethod, "loss", failing_loss)
    with pytest.raises(RuntimeError):
        train_tiny(tmp_path, subject_dir, SHORT + ["train.steps=10", "train.checkpoint_every=5"])
    run_dir = next(tmp_path.iterdir())
    run = RunDir.open(run_dir)
    error = run.events()[-1]
    assert error["event"] == "error" and "simulated CUDA error" in error["message"]
    assert run.checkpoint_steps() == [5]
    monkeypatch.setattr(LoraMethod, "loss", real_loss)
    assert trainers_main([str(run_dir)]) == 0  # `python -m dreamloom.trainers RUN` continues it
    assert run.events()[-1]["event"] == "end"
    assert trainers_main([str(run_dir)]) == 2  # a finished run is not trained again


def test_step_events_carry_mfu_where_the_device_has_a_known_peak(tmp_path, subject_dir, monkeypatch):
    """The FLOPs of one step are counted once, on the first step (CUDA only in real use; a CPU with a
    made-up peak here), and every step event after it carries the MFU."""
    monkeypatch.setattr("dreamloom.trainers.mfu.peak_flops", lambda device, precision: 1e12)
    run, _, _ = train_tiny(tmp_path, subject_dir, ["train.steps=3", "train.log_every=1"])
    steps = [e for e in run.events() if e["event"] == "step"]
    assert len(steps) == 3 and all(e["step_flops"] > 0 and 0 < e["mfu"] for e in steps)
    assert len({e["step_flops"] for e in steps}) == 1  # counted once


def _conv_weights(unet) -> list[torch.Tensor]:
    """The UNet's trained convolution weights with a layout to tell (a 1x1 kernel is both NCHW and NHWC)."""
    return [m.weight for m in unet.modules()
            if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad and m.kernel_size != (1, 1)]


@pytest.mark.parametrize("recipe", ["tiny-locon", "tiny-dreambooth"])
def test_channels_last_weights_train_what_contiguous_weights_train(tmp_path, subject_dir, recipe, monkeypatch):
    """train.channels_last holds the UNet's weights, trained convolutions included, in the layout fast convolutions
    want while it trains, and hands the model back in the plain one; the run's losses and exported files are those
    of a contiguous run, up to the kernels' rounding."""
    from dreamloom.trainers import loop

    layouts, real_step = [], loop.train_step

    def step(state, n):
        layouts.append([w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                        for w in _conv_weights(unwrapped(state.base).unet)])
        real_step(state, n)
    monkeypatch.setattr(loop, "train_step", step)
    sets = SHORT + ["train.steps=3", "export.dtype='fp32'"]
    nhwc = train_tiny(tmp_path / "nhwc", subject_dir, sets, recipe=recipe)
    assert len(layouts) == 3 and all(layouts[0]) and all(all(s) for s in layouts)
    layouts.clear()
    nchw = train_tiny(tmp_path / "nchw", subject_dir, sets + ["train.channels_last=false"], recipe=recipe)
    assert len(layouts) == 3 and not any(any(s) for s in layouts)
    (losses, base, files), (plain_losses, _, plain_files) = (
        ([e["loss"] for e in run.events() if e["event"] == "step"], trained, exports) for run, trained, exports in (nhwc, nchw))
    assert all(w.is_contiguous() for w in _conv_weights(base.unet))  # handed back as a loader would hold it
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    pairs = [(f, plain) for f, plain in zip(files, plain_files) if f.suffix == ".safetensors"]
    assert pairs
    for f, plain in pairs:
        ours, theirs = load_file(f), load_file(plain)
        assert ours.keys() == theirs.keys()
        # Adam divides each step by the gradient's own size: where a gradient is near zero (a LoRA's first steps),
        # rounding moves a weight by up to the learning rate. The weights as a whole stay the same.
        change = sum((ours[k] - theirs[k]).norm() ** 2 for k in ours) ** 0.5
        assert change / sum(v.norm() ** 2 for v in theirs.values()) ** 0.5 < 2e-3
