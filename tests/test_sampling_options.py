"""The sampler as A1111/ComfyUI users drive it: schedulers by their names, CLIP skip, and the
settings of every picture written into its PNG in A1111's "parameters" form."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dreamloom.cli import main
from dreamloom.errors import RecipeError
from dreamloom.models import load_base
from dreamloom.recipes import resolve_recipe
from dreamloom.sampling import generate
from dreamloom.sampling.schedulers import SCHEDULERS, scheduler_name, set_scheduler
from helpers import train_tiny


@pytest.fixture(scope="module")
def tiny_pipe():
    return load_base("tiny").pipeline()


def draw(pipe, **kwargs) -> np.ndarray:
    return np.asarray(generate(pipe, ["a photo of sks star"], steps=6, seed=3, **kwargs)[0], dtype=np.float32)


# torchsde (DPM++ SDE) compares float32 times against float64 ones and warns about a 1e-7 difference
@pytest.mark.filterwarnings("ignore:Should have ta>=t0:UserWarning")
def test_every_scheduler_by_its_a1111_name_draws(tiny_pipe):
    config = dict(tiny_pipe.scheduler.config)
    reference = draw(tiny_pipe)  # the base's own DDIM
    differs = 0
    for name in SCHEDULERS:
        set_scheduler(tiny_pipe, name)
        picture = draw(tiny_pipe)
        assert picture.shape == (64, 64, 3) and np.isfinite(picture).all(), name
        differs += not np.array_equal(picture, reference)
        assert tiny_pipe.scheduler.config.prediction_type == config["prediction_type"]  # the base's schedule kept
    assert differs >= len(SCHEDULERS) - 2  # DDIM itself (and at most one twin) draws as the default does
    set_scheduler(tiny_pipe, "DDIM")
    assert np.array_equal(draw(tiny_pipe), reference)
    assert scheduler_name("dpm++_2m_karras") == "DPM++ 2M Karras" and scheduler_name("EULER A") == "Euler a"


def test_clip_skip_uses_an_earlier_text_encoder_layer():
    toy = load_base("toy").pipeline()  # trained: its pictures follow the text (a random base's barely do)
    assert np.array_equal(draw(toy, clip_skip=1), draw(toy))  # A1111's 1 is the last layer
    assert np.abs(draw(toy, clip_skip=2) - draw(toy)).mean() > 1.0
    assert not hasattr(toy.text_encoder, "text_model")  # the alias for diffusers is gone again (its LoRA loader reads it)


def test_sample_writes_a1111_parameters_into_the_png(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--base", "tiny", "--prompt", "a photo of sks star", "--prompt", "a red star",
                 "--negative", "blurry", "--n", "2", "--seed", "7", "--steps", "3", "--scheduler", "euler a",
                 "--clip-skip", "2", "--guidance", "6", "--out", str(out)]) == 0
    text = Image.open(out).text
    assert text["parameters"] == ("a photo of sks star\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, CFG scale: 6, "
                                  "Seed: 7, Size: 64x64, Model: tiny, Clip skip: 2")
    cells = json.loads(text["dreamloom"])["cells"]
    assert [(c["prompt"], c["seed"]) for c in cells] == [("a photo of sks star", 7), ("a photo of sks star", 8),
                                                           ("a red star", 7), ("a red star", 8)]


def test_an_unknown_scheduler_is_refused_with_the_names(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--base", "tiny", "--prompt", "x", "--scheduler", "k_euler_magic", "--out", str(tmp_path / "a.png")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "k_euler_magic" in err and "DPM++ 2M Karras" in err and not (tmp_path / "a.png").exists()
    with pytest.raises(RecipeError, match="sample.scheduler"):
        resolve_recipe("tiny-lora", ["sample.scheduler='k_euler_magic'"])


def test_validation_samples_use_the_recipes_scheduler(tmp_path, subject_dir):
    run, _, _ = train_tiny(tmp_path, subject_dir, ["train.steps=2", "train.checkpoint_every=0", "sample.steps=2",
                                                   "sample.images_per_prompt=1", "sample.scheduler='dpm++ 2m karras'",
                                                   "sample.clip_skip=2"])
    sample = next(e for e in run.events() if e["event"] == "sample")
    assert sample["scheduler"] == "DPM++ 2M Karras" and Image.open(sample["path"]).width == 64


@pytest.fixture(scope="module")
def start_picture(tmp_path_factory):
    """A toy-world picture (a red star on a pink background) to start from."""
    from dreamloom.toy.world import random_scene, render

    path = tmp_path_factory.mktemp("init") / "start.png"
    render(random_scene(np.random.default_rng(0), "star", "red", "pink")).save(path)
    return path


def test_img2img_keeps_more_of_the_picture_the_lower_the_strength(start_picture, tmp_path):
    start = np.asarray(Image.open(start_picture).convert("RGB"), dtype=np.float32)
    change = {}
    for strength in ("0.2", "0.9"):
        out = tmp_path / f"s{strength}.png"
        assert main(["sample", "--base", "toy", "--prompt", "a blue circle on a green background", "--steps", "10",
                     "--guidance", "3", "--init-image", str(start_picture), "--strength", strength, "--out", str(out)]) == 0
        change[strength] = np.abs(np.asarray(Image.open(out).convert("RGB"), dtype=np.float32) - start).mean()
        assert f"Denoising strength: {float(strength):g}" in Image.open(out).text["parameters"]
    assert change["0.2"] < 0.7 * change["0.9"], change  # measured 23 vs 40 (of 255) per pixel


def test_inpainting_redraws_the_white_part_and_keeps_the_rest(start_picture, tmp_path):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # re-draw the right half
    mask.save(tmp_path / "mask.png")
    start = np.asarray(Image.open(start_picture).convert("RGB"), dtype=np.float32)
    diffs = {}
    for name, extra in (("inpainted", ["--mask", str(tmp_path / "mask.png")]), ("img2img", [])):
        out = tmp_path / f"{name}.png"
        assert main(["sample", "--base", "toy", "--prompt", "a blue circle on a green background", "--steps", "10",
                     "--guidance", "3", "--seed", "3", "--init-image", str(start_picture), "--strength", "1.0",
                     "--out", str(out), *extra]) == 0
        diff = np.abs(np.asarray(Image.open(out).convert("RGB"), dtype=np.float32) - start)
        diffs[name] = (diff[:, :28].mean(), diff[:, 36:].mean())  # (kept half, re-drawn half)
    kept, redrawn = diffs["inpainted"]
    assert kept < 0.5 * diffs["img2img"][0], diffs  # measured about 10 (the VAE's own error: 7) vs 36
    assert redrawn > 1.4 * kept, diffs
    # measured 10 vs 17: the new shape is drawn on the picture's own background, which stays pink


@pytest.mark.parametrize("args, words", [(["--mask", "m.png"], ["--init-image PICTURE"]),
                                         (["--init-image", "nowhere.png"], ["nowhere.png", "does not exist"]),
                                         (["--init-image", "notes.txt"], ["notes.txt", "not a readable picture"])])
def test_bad_start_pictures_are_refused_before_a_model_loads(args, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["sample", "--base", "toy", "--prompt", "x", "--out", "o.png", *args]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and not (tmp_path / "o.png").exists(), err
