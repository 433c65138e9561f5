"""LoCon, LoHa, LoKr and DoRA on the tiny base: each learns, leaves the base's weights alone, writes
the layout A1111/Forge and ComfyUI read (LyCORIS's keys), and reloads through our sampler (and
diffusers, for the formats it reads) to the in-memory model's image; strength 0 is the base."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreamloom.cli import main
from dreamloom.models import ARCHS, build_random, load_base
from dreamloom.sampling import attach_loras
from dreamloom.studio.library import run_exports
from helpers import base_weights, image, trained_once

RECIPES = ["tiny-locon", "tiny-loha", "tiny-lokr", "tiny-dora"]
# what each file holds per adapted layer, besides `.alpha` (LyCORIS's names, which A1111 and ComfyUI read)
KEYS = {"tiny-locon": {"lora_down.weight", "lora_up.weight"}, "tiny-dora": {"lora_down.weight", "lora_up.weight",
        "dora_scale"}, "tiny-loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
        # LoKr: rank 4 is large for tiny's 32-wide layers, so LyCORIS makes w2 a full matrix; not for the
        # conv layers at conv.rank 2, whose w2 is factored
        "tiny-lokr": {"lokr_w1", "lokr_w2"}, "tiny-lokr conv": {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}}
NETWORK = {"tiny-locon": ("networks.lora", {"conv_dim": "4", "conv_alpha": "4.0"}),
           "tiny-dora": ("lycoris.kohya", {"algo": "lora", "dora_wd": "True"}),
           "tiny-loha": ("lycoris.kohya", {"algo": "loha", "conv_dim": "2", "conv_alpha": "2.0"}),
           "tiny-lokr": ("lycoris.kohya", {"algo": "lokr", "conv_dim": "2", "conv_alpha": "2.0", "factor": "-1",
                                           "decompose_both": "False"})}
ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, subject_dir):
    return trained_once(tmp_path_factory.mktemp("lycoris"), subject_dir, {r: (r, []) for r in RECIPES})


@pytest.mark.parametrize("recipe", RECIPES)
def test_learns_and_leaves_the_base_alone(recipe, runs):
    run, trained, _ = runs(recipe)
    end = next(e for e in run.events() if e["event"] == "end")
    assert end["loss_after"] < 0.9 * end["loss_before"], end
    fresh = load_base("tiny")
    for part in ("unet", "vae", "text_encoder"):
        after = {k: v for k, v in base_weights(getattr(trained, part)).items() if "lycoris" not in k}
        before = base_weights(getattr(fresh, part))
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), part


@pytest.mark.parametrize("recipe", RECIPES)
def test_file_layout_and_metadata(recipe, runs):
    _, _, exports = runs(recipe)
    tensors = load_file(exports[0])
    with safe_open(exports[0], "pt") as f:
        meta = f.metadata()
    for layer in (ATTN, CONV) if recipe != "tiny-dora" else (ATTN,):
        keys = KEYS.get(f"{recipe} conv", KEYS[recipe]) if layer == CONV else KEYS[recipe]
        assert {k.removeprefix(layer + ".") for k in tensors if k.startswith(layer + ".")} == keys | {"alpha"}
    assert (CONV + ".alpha" in tensors) == (recipe != "tiny-dora")  # DoRA here: attention only, as tiny-lora
    module, args = NETWORK[recipe]
    assert meta["ss_network_module"] == module and json.loads(meta.get("ss_network_args", "{}")) == args
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "tiny"
    if recipe == "tiny-locon":  # 3x3 convolutions get the conv rank, the linear layers the LoRA rank
        assert tensors[CONV + ".lora_down.weight"].shape == (4, 32, 3, 3)
        assert tensors[CONV + ".lora_up.weight"].shape == (32, 4, 1, 1) and tensors[CONV + ".alpha"] == 4.0
        assert tensors[ATTN + ".alpha"] == 8.0
    if recipe == "tiny-dora":  # one magnitude per output channel, as LyCORIS writes it
        assert tensors[ATTN + ".dora_scale"].shape == (32, 1)
    if recipe == "tiny-loha":
        assert tensors[CONV + ".hada_w1_a"].shape == (32, 2) and tensors[CONV + ".hada_w1_b"].shape == (2, 32 * 9)


@pytest.mark.parametrize("recipe", RECIPES)
def test_exports_reload_to_the_same_image_and_strength_zero_is_the_base(recipe, runs):
    _, trained, exports = runs(recipe)
    expected, plain = image(trained.pipeline()), image(load_base("tiny").pipeline())
    for path in exports:  # the kohya file through our patcher; the diffusers file through diffusers
        base = load_base("tiny")
        pipe = base.pipeline()
        detach = attach_loras(pipe, base, [(path, 1.0)])
        assert np.abs(image(pipe) - expected).max() < 1e-4, path
        detach()
        assert np.array_equal(image(pipe), plain), path  # taken off again, exactly
    assert np.abs(plain - expected).max() > 1e-2  # the adapter matters
    base = load_base("tiny")
    pipe = base.pipeline()
    attach_loras(pipe, base, [(exports[0], 0.0)])
    assert np.array_equal(image(pipe), plain)


def test_a_file_written_by_lycoris_itself_loads_to_lycoris_own_image(tmp_path):
    """Another tool's file: LyCORIS's own network (its kohya naming) on the tiny UNet, saved by it."""
    from lycoris import create_lycoris
    from lycoris.wrapper import LycorisNetwork

    base = load_base("tiny")
    torch.manual_seed(0)
    network = create_lycoris(base.unet, 1.0, linear_dim=4, linear_alpha=2.0, algo="loha", preset="attn-only")
    network.apply_to()
    with torch.no_grad():  # LoHa starts at dW = 0: give it weights of its own
        for p in network.parameters():
            p.normal_(0, 0.3)
    network.save_weights(str(tmp_path / "other.safetensors"), torch.float32, None)
    expected = image(base.pipeline())
    network.restore()
    LycorisNetwork.LORA_PREFIX = "lycoris"  # create_lycoris set it class-wide
    renamed = {k.replace("lycoris_", "lora_unet_", 1): v for k, v in load_file(tmp_path / "other.safetensors").items()}
    save_file(renamed, tmp_path / "other-kohya.safetensors")
    fresh = load_base("tiny")
    pipe = fresh.pipeline()
    attach_loras(pipe, fresh, [(tmp_path / "other-kohya.safetensors", 1.0)])
    assert np.abs(image(pipe) - expected).max() < 1e-4


def test_the_studio_lists_and_tries_them(runs):
    run, _, _ = runs("tiny-loha")
    (row,) = run_exports(run)
    assert (row.format, row.try_it, row.path.name) == ("kohya", "lora", "sks-loha.safetensors")
    assert "ComfyUI" in row.loads_in


def run_cli(args, capsys) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("recipe, sets, words", [
    ("tiny-lokr", ["lokr.factor=3"], ["lokr.factor = 3", "does not divide", "32 out"]),
    ("tiny-loha", ["lora.rank=64"], ["lora.rank = 64", "larger than layer", "choose lora.rank <= 32"]),
    ("tiny-locon", ["conv.rank=300"], ["conv.rank = 300", "larger than layer"]),
    ("tiny-lora", ["conv.rank=8"], ["section [conv] does not apply to method 'lora'"]),
    ("tiny-dora", ["train.weights_dtype='bf16'", "train.fused_backward=true", "train.mixed_precision='bf16'"],
     ["lora.use_dora", "weights_dtype"]),
    ("tiny-dora", ["lora.train_text_encoder=true", "lora.text_encoder_target_modules=['token_embedding']"],
     ["lora.use_dora", "token_embedding", "linear and convolution layers only"]),
])
def test_bad_settings_are_refused_before_training(recipe, sets, words, subject_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    err = run_cli(["train", recipe, "--data", str(subject_dir), "--out", str(out),
                   *[a for s in sets for a in ("--set", s)]], capsys)
    for word in words:
        assert word in err, err
    assert not out.exists()


def test_a_lycoris_file_for_another_base_is_refused(tmp_path, capsys):
    sd15 = build_random(ARCHS["sd15"], meta=True)
    layer = sd15.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    path = tmp_path / "sd15-loha.safetensors"
    save_file({f"{ATTN}.hada_w1_a": torch.zeros(layer.out_features, 4), f"{ATTN}.hada_w1_b": torch.zeros(4, 320),
               f"{ATTN}.hada_w2_a": torch.zeros(layer.out_features, 4), f"{ATTN}.hada_w2_b": torch.zeros(4, 320),
               f"{ATTN}.alpha": torch.tensor(4.0)}, path, metadata={"ss_base_model_version": "sd_v1"})
    err = run_cli(["sample", "--base", "tiny", "--lora", str(path), "--prompt", "x",
                   "--out", str(tmp_path / "g.png")], capsys)
    assert str(path) in err and "does not fit" in err and "sd_v1" in err
    assert not (tmp_path / "g.png").exists()
