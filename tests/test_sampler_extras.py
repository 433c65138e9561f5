"""The rest of the A1111 user's sampler: prompt weights and long prompts, --batch, the hires fix,
ControlNet, X/Y plots, img2img at strength 0, inpainting's kept pixels, PNG parameters read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dreamloom.cli import main
from dreamloom.models import load_base
from dreamloom.sampling import generate
from dreamloom.sampling.images import Hires
from dreamloom.sampling.pnginfo import read_parameters
from dreamloom.sampling.prompts import encode_prompt, parse_weights
from helpers import train_tiny


@pytest.fixture(scope="module")
def pipes():
    return {spec: load_base(spec).pipeline() for spec in ("tiny", "tiny-xl", "toy")}


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_a1111_weights_are_parsed_as_a1111_reads_them():
    assert parse_weights("a (red:1.5) heart") == [("a ", 1.0), ("red", 1.5), (" heart", 1.0)]
    nested = dict(parse_weights("((red)) [blue] shape"))
    assert nested["red"] == pytest.approx(1.21) and nested["blue"] == pytest.approx(1 / 1.1)
    assert parse_weights(r"a \(literal\) bracket") == [("a (literal) bracket", 1.0)]
    assert parse_weights("one BREAK two") == [("one", 1.0), ("BREAK", -1.0), ("two", 1.0)]


@pytest.mark.parametrize("spec", ["tiny", "tiny-xl"])
def test_a_plain_prompt_is_encoded_exactly_as_diffusers_does(pipes, spec):
    pipe = pipes[spec]
    ours = encode_prompt(pipe, "a red heart on a blue background")
    theirs = pipe.encode_prompt("a red heart on a blue background", device="cpu", num_images_per_prompt=1,
                                do_classifier_free_guidance=False)
    assert torch.equal(ours["hidden"], theirs[0])
    if spec == "tiny-xl":
        assert torch.equal(ours["pooled"], theirs[2])


@pytest.mark.parametrize("spec", ["tiny", "tiny-xl"])
def test_a_weight_scales_its_tokens_states_against_the_others(pipes, spec):
    pipe = pipes[spec]
    position = 2  # start token, "a", then "red"
    plain, heavy, light = (encode_prompt(pipe, p)["hidden"][0] for p in
                           ("a red heart", "a (red:1.5) heart", "a [red] heart"))
    ratio = lambda h: (h[position].norm() / h[position + 1].norm()).item()  # red against heart  # noqa: E731
    assert ratio(heavy) == pytest.approx(1.5 * ratio(plain), rel=1e-4)
    assert ratio(light) == pytest.approx(ratio(plain) / 1.1, rel=1e-4)
    assert heavy.mean().item() == pytest.approx(plain.mean().item(), rel=1e-4, abs=1e-6)  # A1111 keeps the mean


def test_a_long_prompt_is_read_past_77_tokens_in_chunks(pipes):
    pipe = pipes["tiny"]
    filler = ", ".join(["a small heart"] * 30)  # about 120 tokens
    red, blue = (encode_prompt(pipe, f"{filler}, a {c} star")["hidden"] for c in ("red", "blue"))
    assert red.shape[1] == 2 * 77
    assert not torch.equal(red[:, 77:], blue[:, 77:])  # words after the 77th token still count
    assert encode_prompt(pipe, "a red heart BREAK a blue star")["hidden"].shape[1] == 2 * 77
    # a negative prompt is padded with empty chunks to the prompt's length (and the other way round)
    images = generate(pipe, [f"{filler}, a red star"], negative_prompt="blurry", steps=2, seed=0)
    assert images[0].size == (64, 64)


def test_batch_size_changes_speed_not_pictures(pipes):
    pipe = pipes["tiny"]
    one_by_one = generate(pipe, ["a red star"], steps=3, seed=5, images_per_prompt=3, batch=1)
    at_once = generate(pipe, ["a red star"], steps=3, seed=5, images_per_prompt=3, batch=3)
    for a, b in zip(one_by_one, at_once):
        assert np.abs(pixels(a) - pixels(b)).max() <= 2  # measured 0-1 (batched matmuls round differently)
    assert np.abs(pixels(one_by_one[0]) - pixels(one_by_one[1])).mean() > 1  # each picture its own seed


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_fix_draws_larger_and_keeps_the_first_pass_composition(pipes, upscaler):
    pipe = pipes["toy"]
    prompt = ["a red heart on a blue background"]
    small = generate(pipe, prompt, steps=8, guidance_scale=3, seed=1)[0]
    large = generate(pipe, prompt, steps=8, guidance_scale=3, seed=1, hires=Hires(2.0, 0.4, upscaler))[0]
    other = generate(pipe, ["a green circle on a yellow background"], steps=8, guidance_scale=3, seed=2)[0]
    assert large.size == (128, 128)
    back = pixels(large.resize(small.size, Image.LANCZOS))
    assert np.abs(back - pixels(small)).mean() < 0.5 * np.abs(pixels(other) - pixels(small)).mean()


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory, pipes):
    """ControlNets of the toy and tiny-xl bases from their UNets (diffusers' own from_unet), with the
    zero-initialised output convolutions randomised so that the control picture matters."""
    from diffusers import ControlNetModel

    folders = {}
    for spec in ("toy", "tiny-xl"):
        controlnet = ControlNetModel.from_unet(pipes[spec].unet)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in controlnet.named_parameters():
                if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
                elif name.startswith("controlnet_cond_embedding"):  # the control picture's way in
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        folders[spec] = tmp_path_factory.mktemp(f"cn-{spec}")
        controlnet.save_pretrained(folders[spec])
    return folders


def edges(box) -> Image.Image:
    from PIL import ImageDraw

    picture = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(picture).rectangle(box, outline="white", width=3)
    return picture


def test_controlnet_follows_its_picture_and_scale_zero_is_off(controlnets, tmp_path):
    edges((8, 8, 30, 30)).save(tmp_path / "a.png")
    edges((30, 30, 56, 56)).save(tmp_path / "b.png")
    common = ["sample", "--base", "toy", "--prompt", "a red heart on a blue background", "--steps", "6",
              "--guidance", "3", "--seed", "4"]
    assert main([*common, "--out", str(tmp_path / "plain.png")]) == 0
    for name, control, scale in (("a", "a.png", "1"), ("b", "b.png", "1"), ("off", "a.png", "0")):
        assert main([*common, "--controlnet", str(controlnets["toy"]), "--control-image", str(tmp_path / control),
                     "--control-scale", scale, "--out", str(tmp_path / f"drawn-{name}.png")]) == 0
    picture = {n: pixels(Image.open(tmp_path / f"drawn-{n}.png")) for n in ("a", "b", "off")}
    picture["plain"] = pixels(Image.open(tmp_path / "plain.png"))
    assert np.abs(picture["off"] - picture["plain"]).max() <= 2  # measured 0
    assert np.abs(picture["a"] - picture["b"]).mean() > 3  # measured about 20
    assert "ControlNet 0" in Image.open(tmp_path / "drawn-a.png").text["parameters"]


def test_a_controlnet_of_another_family_is_refused(controlnets, tmp_path, capsys):
    edges((8, 8, 30, 30)).save(tmp_path / "a.png")
    assert main(["sample", "--base", "tiny-xl", "--prompt", "x", "--steps", "2", "--controlnet", str(controlnets["toy"]),
                 "--control-image", str(tmp_path / "a.png"), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "SD 1.x/2.x" in err and "cross_attention_dim" in err and not (tmp_path / "o.png").exists()


def test_img2img_at_strength_zero_gives_back_the_picture_through_the_vae(pipes):
    from dreamloom.sampling.images import vae_round_trip
    from dreamloom.toy.world import random_scene, render

    start = render(random_scene(np.random.default_rng(0), "star", "red", "pink"))
    kept = generate(pipes["toy"], ["a blue circle"], steps=10, seed=0, init_image=start, strength=0.0)[0]
    assert np.array_equal(pixels(kept), pixels(vae_round_trip(pipes["toy"], start)))
    assert np.abs(pixels(kept) - pixels(start)).mean() < 12  # the toy VAE's own error: measured about 7


def test_inpainting_keeps_the_unmasked_pixels(pipes):
    from dreamloom.toy.world import random_scene, render

    start = render(random_scene(np.random.default_rng(0), "star", "red", "pink"))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    out = generate(pipes["toy"], ["a blue circle on a green background"], steps=8, seed=3, init_image=start,
                   mask=mask, strength=1.0)[0]
    diff = np.abs(pixels(out) - pixels(start))
    assert diff[:, :32].max() == 0 and diff[:, 32:].mean() > 5


def test_a_mask_of_another_size_is_refused(tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "p.png")
    Image.new("L", (32, 64)).save(tmp_path / "m.png")
    assert main(["sample", "--base", "toy", "--prompt", "x", "--init-image", str(tmp_path / "p.png"),
                 "--mask", str(tmp_path / "m.png"), "--out", str(tmp_path / "o.png")]) == 2
    assert "32x64" in capsys.readouterr().err


def test_png_parameters_read_back_into_the_same_settings(tmp_path):
    out = tmp_path / "o.png"
    assert main(["sample", "--base", "tiny", "--prompt", "a (red:1.2) star, detailed", "--negative", "blurry, low",
                 "--steps", "3", "--seed", "11", "--scheduler", "euler a", "--guidance", "5.5", "--n", "2",
                 "--each", "--out", str(out)]) == 0
    prompt, negative, fields = read_parameters(Image.open(tmp_path / "o-00002.png").text["parameters"])
    assert (prompt, negative) == ("a (red:1.2) star, detailed", "blurry, low")
    assert fields == {"Steps": "3", "Sampler": "Euler a", "CFG scale": "5.5", "Seed": "12",
                      "Size": "64x64", "Model": "tiny"}
    hires = read_parameters('p\nSteps: 2, ControlNet 0: "Module: none, Model: c, Weight: 1", Seed: 3')[2]
    assert hires == {"Steps": "2", "ControlNet 0": '"Module: none, Model: c, Weight: 1"', "Seed": "3"}


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, subject_dir):
    run, _, exports = train_tiny(tmp_path_factory.mktemp("xy"), subject_dir,
                                 ["train.steps=4", "train.checkpoint_every=2", "train.learning_rate=0.05"])
    return run, exports


def test_xy_plot_over_strength_and_checkpoint_step(checkpointed_run, tmp_path):
    run, _ = checkpointed_run
    out = tmp_path / "xy.png"
    assert main(["sample", "--run", str(run.path), "--prompt", "a photo of sks star", "--steps", "3",
                 "--x", "strength=0,1", "--y", "step=2,4", "--out", str(out)]) == 0
    picture = Image.open(out)
    info = json.loads(picture.text["dreamloom"])
    assert info["axes"] == {"strength": [0.0, 1.0], "step": [2, 4]}
    assert [c["axes"] for c in info["cells"]] == [{"strength": 0.0, "step": 2}, {"strength": 1.0, "step": 2},
                                                 {"strength": 0.0, "step": 4}, {"strength": 1.0, "step": 4}]
    assert picture.width > 2 * 64 and picture.height > 2 * 64  # cells and their labels
    cells = pixels(picture)[-128:, -128:]  # the cells sit at the bottom right, below and beside the labels
    off_2, on_2, off_4, on_4 = cells[:64, :64], cells[:64, 64:], cells[64:, :64], cells[64:, 64:]
    assert np.abs(off_2 - off_4).max() <= 1  # strength 0 is the base, whatever the checkpoint
    assert np.abs(on_2 - on_4).mean() > 0.5 and np.abs(on_4 - off_4).mean() > 0.5
    assert (run.path / "exports" / "step-2").is_dir()  # a checkpoint is exported beside, never over the final files


@pytest.mark.parametrize("args, words", [
    (["--x", "colour=1,2"], ["colour=1,2", "strength"]),
    (["--x", "step=1,2"], ["--run RUN"]),
    (["--x", "strength=0,1"], ["--lora"]),
    (["--x", "seed=a,b"], ["int"]),
    (["--x", "seed=1,2", "--y", "seed=3"], ["two different"]),
    (["--x", "prompt=blue,green"], ["'blue'", "in no --prompt"]),
])
def test_bad_xy_axes_are_refused_before_a_model_loads(args, words, tmp_path, capsys):
    assert main(["sample", "--base", "tiny", "--prompt", "a red star", "--out", str(tmp_path / "o.png"), *args]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and not (tmp_path / "o.png").exists(), err


def test_a_step_the_run_does_not_have_is_refused(checkpointed_run, tmp_path, capsys):
    run, _ = checkpointed_run
    assert main(["sample", "--run", str(run.path), "--prompt", "x", "--y", "step=2,3",
                 "--out", str(tmp_path / "o.png")]) == 2
    assert "no checkpoint at step 3" in capsys.readouterr().err


def test_every_option_on_sdxl(controlnets, pipes, tmp_path):
    """SDXL's pipelines take the pooled embeddings too: weights, a long prompt, hires fix, img2img,
    inpainting and ControlNet all draw on tiny-xl."""
    from dreamloom.sampling.controlnet import Control, load_controlnet

    pipe, prompt = pipes["tiny-xl"], [", ".join(["a (red:1.2) star"] * 30)]
    first = generate(pipe, prompt, steps=2, seed=0, width=64, height=64, hires=Hires(1.5, 0.5, "lanczos"))[0]
    assert first.size == (96, 96)
    start = first.resize((64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    inpainted = generate(pipe, prompt, steps=2, seed=0, init_image=start, mask=mask, strength=1.0)[0]
    assert np.abs(pixels(inpainted) - pixels(start))[:, 32:].max() == 0
    model = load_controlnet(controlnets["tiny-xl"])
    drawn = [generate(pipe, ["a star"], steps=2, seed=0, width=64, height=64,
                      control=Control(model, edges(box)))[0] for box in ((8, 8, 30, 30), (30, 30, 56, 56))]
    assert np.abs(pixels(drawn[0]) - pixels(drawn[1])).mean() > 0.5
