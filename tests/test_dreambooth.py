"""DreamBooth on the tiny base: learning, prior preservation, the memory features, exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreamloom.cli import main
from dreamloom.models import load_base
from dreamloom.recipes import resolve_recipe
from dreamloom.errors import RecipeError
from dreamloom.trainers.fused import stochastic_round_to_bf16
from dreamloom.trainers.run import export_run
from helpers import image, train_tiny

NO_PRIOR = ["prior.enabled=false"]
SHORT = ["train.steps=5", "train.checkpoint_every=0", "sample.steps=2", "sample.images_per_prompt=1"]


@pytest.fixture(scope="module")
def with_prior(tmp_path_factory, subject_dir):
    return train_tiny(tmp_path_factory.mktemp("db"), subject_dir, [], recipe="tiny-dreambooth")


@pytest.fixture(scope="module")
def without_prior(tmp_path_factory, subject_dir):
    return train_tiny(tmp_path_factory.mktemp("db"), subject_dir, NO_PRIOR, recipe="tiny-dreambooth")


def events(run, kind):
    return [e for e in run.events() if e["event"] == kind]


def test_dreambooth_learns_the_subject(with_prior):
    run, trained, _ = with_prior
    end = events(run, "end")[0]
    assert end["loss_after"] < 0.5 * end["loss_before"], end
    fresh = load_base("tiny")
    vae, trained_vae = fresh.vae.state_dict(), trained.vae.state_dict()
    assert all(torch.equal(vae[k], trained_vae[k]) for k in vae)  # only the UNet trains
    te, trained_te = fresh.text_encoder.state_dict(), trained.text_encoder.state_dict()
    assert all(torch.equal(te[k], trained_te[k]) for k in te)


@torch.no_grad()
def class_loss(model, files) -> float:
    """The model's denoising loss on the class images under the class prompt (fixed noise)."""
    from dreamloom.datasets import load_image

    pixels = torch.stack([load_image(f, 64) for f in files])
    latents = model.vae.encode(pixels).latent_dist.mean * model.vae.config.scaling_factor
    ids = model.tokenizer(["a photo of star"] * len(files), padding="max_length", max_length=77,
                          return_tensors="pt").input_ids
    hidden = model.text_encoder(ids)[0]
    g = torch.Generator().manual_seed(0)
    losses = []
    for t in range(50, 1000, 100):
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.full((len(files),), t)
        noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
        losses.append(torch.mean((model.unet(noisy, timesteps, hidden).sample - noise) ** 2).item())
    return sum(losses) / len(losses)


def test_prior_preservation_trains_on_the_class_images(with_prior, without_prior):
    """Each step carries class images under the class prompt: the run with prior preservation
    models them far better than the same run without it.

    (That this also keeps the class closer to the base model needs a base that already knows the
    class; the random tiny base does not, so that comparison waits for the pretrained toy base.)"""
    run, trained_prior, _ = with_prior
    _, trained_plain, _ = without_prior
    info = events(run, "class_images")[0]
    assert events(run, "start")[0]["class_images"] == info["count"] == 8
    files = sorted(Path(info["folder"]).glob("class-*.png"))
    assert len(files) == 8
    assert class_loss(trained_prior, files) < 0.85 * class_loss(trained_plain, files)  # 0.77 measured


def test_class_images_are_generated_once(with_prior, tmp_path, subject_dir):
    first = events(with_prior[0], "class_images")[0]
    run, _, _ = train_tiny(tmp_path, subject_dir, SHORT, recipe="tiny-dreambooth")
    again = events(run, "class_images")[0]
    assert first["generated"] == 8 and again["generated"] == 0 and again["folder"] == first["folder"]


@pytest.mark.parametrize("fmt", ["single_file", "diffusers"])
def test_exports_reload_to_the_same_image(with_prior, fmt):
    _, trained, exports = with_prior
    path = exports[0] if fmt == "single_file" else exports[1]
    reloaded = load_base(str(path))
    assert np.abs(image(reloaded.pipeline()) - image(trained.pipeline())).max() < 1e-4
    assert np.abs(image(load_base("tiny").pipeline()) - image(trained.pipeline())).max() > 1e-2


def test_sampler_takes_the_exported_checkpoint_as_base(with_prior, tmp_path, capsys):
    _, _, exports = with_prior
    out = tmp_path / "grid.png"
    assert main(["sample", "--base", str(exports[0]), "--prompt", "a photo of sks star", "--steps", "3",
                 "--out", str(out)]) == 0
    assert out.is_file()


def unet_after(tmp_path, subject_dir, sets):
    run, trained, _ = train_tiny(tmp_path, subject_dir, SHORT + NO_PRIOR + sets, recipe="tiny-dreambooth")
    return {k: v.detach().clone() for k, v in trained.unet.state_dict().items()}, run


def test_fused_backward_equals_the_ordinary_step(tmp_path, subject_dir):
    plain, _ = unet_after(tmp_path / "a", subject_dir, ["train.max_grad_norm=0"])
    fused, _ = unet_after(tmp_path / "b", subject_dir, ["train.max_grad_norm=0", "train.fused_backward=true"])
    base = load_base("tiny").unet.state_dict()
    assert any(not torch.equal(plain[k], base[k]) for k in plain)
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=0, atol=1e-6, msg=key)


def test_fused_backward_clips_each_tensor(tmp_path, subject_dir):
    """With a tiny clipping norm each update is bounded, so the weights move far less."""
    base = load_base("tiny").unet.state_dict()
    free, _ = unet_after(tmp_path / "a", subject_dir, ["train.fused_backward=true", "train.max_grad_norm=0",
                                                       "train.optimizer='prodigy'", "train.learning_rate=1.0"])
    clipped, _ = unet_after(tmp_path / "b", subject_dir, ["train.fused_backward=true", "train.max_grad_norm=1e-6",
                                                          "train.optimizer='prodigy'", "train.learning_rate=1.0"])
    move = lambda w: sum((w[k] - base[k]).abs().sum().item() for k in base)  # noqa: E731
    assert move(clipped) < 0.5 * move(free)


def test_stochastic_rounding_keeps_small_updates():
    g = torch.Generator().manual_seed(0)
    x = torch.full((10_000,), 1.0 + 1e-3)  # 1.001 lies between bf16 neighbours 1.0 and 1.0078
    rounded = stochastic_round_to_bf16(x, g).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0078125}
    assert abs(rounded.mean().item() - 1.001) < 2e-4  # unbiased, where plain rounding gives 1.0
    assert torch.equal(stochastic_round_to_bf16(torch.tensor([1.5, -2.0])), torch.tensor([1.5, -2.0]).bfloat16())


def test_bf16_weights_train(tmp_path, subject_dir):
    sets = ["train.fused_backward=true", "train.weights_dtype='bf16'", "train.mixed_precision='bf16'",
            "train.steps=20"]
    run, trained, _ = train_tiny(tmp_path, subject_dir, SHORT + NO_PRIOR + sets, recipe="tiny-dreambooth")
    assert trained.unet.conv_in.weight.dtype == torch.bfloat16
    end = events(run, "end")[0]
    assert end["loss_after"] < end["loss_before"]


def test_bf16_weights_need_the_fused_pass():
    with pytest.raises(RecipeError, match="fused_backward"):
        resolve_recipe("tiny-dreambooth", ["train.weights_dtype='bf16'"])


def test_text_encoder_trains_until_its_stop_step(tmp_path, subject_dir):
    sets = ["dreambooth.train_text_encoder=true", "dreambooth.text_encoder_steps=3", "train.steps=6",
            "train.checkpoint_every=3", "train.text_encoder_lr=1e-3"]
    run, trained, _ = train_tiny(tmp_path, subject_dir, SHORT + NO_PRIOR + sets, recipe="tiny-dreambooth")
    at3 = load_file(run.checkpoint_dir(3) / "trainable.safetensors")
    at6 = load_file(run.checkpoint_dir(6) / "trainable.safetensors")
    base = load_base("tiny").text_encoder.state_dict()
    te_keys = [k for k in at6 if k.startswith("text_encoder.")]
    assert te_keys and any(not torch.equal(at3[k], base[k.removeprefix("text_encoder.")]) for k in te_keys)
    assert all(torch.equal(at3[k], at6[k]) for k in te_keys)  # frozen after step 3
    assert any(not torch.equal(at3[k], at6[k]) for k in at6 if k.startswith("unet."))  # the UNet went on


def test_ema_weights_are_exported(tmp_path, subject_dir):
    sets = ["train.ema=true", "train.ema_on_cpu=true", "train.steps=10", "export.formats=['single_file']"]
    run, trained, exports = train_tiny(tmp_path, subject_dir, SHORT + NO_PRIOR + sets, recipe="tiny-dreambooth")
    exported = load_base(str(exports[0])).unet.state_dict()
    live = trained.unet.state_dict()
    base = load_base("tiny").unet.state_dict()
    key = "down_blocks.0.attentions.0.proj_in.weight"
    assert not torch.equal(exported[key], live[key]) and not torch.equal(exported[key], base[key])
    ema = load_file(run.latest_checkpoint() / "ema.safetensors")
    torch.testing.assert_close(exported[key], ema[f"unet.{key}"])
    reexported = export_run(run.path, overwrite=True)  # re-exports take the EMA weights too
    torch.testing.assert_close(load_base(str(reexported[0])).unet.state_dict()[key], ema[f"unet.{key}"])


@pytest.mark.parametrize("setting, message", [
    ("prior.num_class_images=0", "prior.num_class_images"),
    ("data.class_word=''", "needs data.class_word"),
])
def test_bad_prior_settings(setting, message):
    with pytest.raises(RecipeError, match=message):
        resolve_recipe("tiny-dreambooth", [setting])


def test_class_folder_with_bad_images_is_refused_before_a_run_exists(tmp_path, subject_dir, capsys):
    from PIL import Image

    classes = tmp_path / "classes"
    classes.mkdir()
    Image.new("RGB", (64, 64), "gray").save(classes / "ok.png")
    (classes / "bad.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "runs"
    code = main(["train", "tiny-dreambooth", "--data", str(subject_dir), "--out", str(out),
                 "--set", f"prior.class_data='{classes}'"])
    assert code == 2 and "bad.jpg" in capsys.readouterr().err
    assert not out.exists()
