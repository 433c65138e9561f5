"""SDXL as one more family: random:sdxl is the published architecture (its parameter counts, and the key
names and shapes of every export written out literally against SDXL base 1.0's files), and on tiny-xl
every method trains, and every export reloads through diffusers' own SDXL loaders (and ours) to the
in-memory model's image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from dreamloom.cli import main
from dreamloom.export.embeddings import bundle_tensors, file_tensors
from dreamloom.export.ldm_checkpoint import to_ldm_state_dict
from dreamloom.export.lora import kohya_tensors
from dreamloom.models import load_base
from dreamloom.models.base import meta_base
from dreamloom.models.hypernetwork import context_widths
from dreamloom.recipes import resolve_recipe
from dreamloom.sampling.runs import load_run_model
from dreamloom.trainers.registry import get_method
from dreamloom.trainers.run import check_run_inputs
from helpers import image, train_tiny, trained_once

PROMPT = "a photo of sks star"


@pytest.fixture(scope="module")
def sdxl():
    return meta_base("random:sdxl")


def test_random_sdxl_has_the_published_parameter_counts(sdxl):
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in sdxl.modules().items()}
    # UNet about 2.567 B, CLIP-L 123 M, OpenCLIP-G with its projection about 695 M, VAE 83.7 M
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}


# Keys and shapes of sd_xl_base_1.0.safetensors, the published single file
SINGLE_FILE = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
    "model.diffusion_model.input_blocks.8.0.in_layers.2.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_out.0.weight": (1280, 1280),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
    "conditioner.embedders.1.model.ln_final.weight": (1280,),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
    "first_stage_model.encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
}


def test_single_file_layout_is_sdxl_base_1_0s(sdxl):
    shapes = {k: tuple(v.shape) for k, v in to_ldm_state_dict(sdxl).items()}
    assert {k: shapes.get(k) for k in SINGLE_FILE} == SINGLE_FILE
    assert not any(k.startswith("cond_stage_model.") for k in shapes)  # SD 1.x/2.x's text encoder key
    assert not any("output_blocks.8.2" in k or "input_blocks.9." in k for k in shapes)  # no sampler at the ends
    assert not any(".attentions." in k or "down_blocks" in k for k in shapes)  # nothing left in diffusers names


def test_kohya_lora_names_are_kohyas_sdxl_trainers(sdxl):
    recipe = resolve_recipe("sdxl-lora-12gb", ["lora.train_text_encoder=true", "lora.rank=4"])
    method = get_method("lora")(recipe)
    method.prepare(sdxl)
    tensors = kohya_tensors(sdxl, method.part_state_dicts(sdxl), method.configs(sdxl))
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    for key, shape in {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": (4, 640),
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k.lora_down.weight": (4, 2048),
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v.lora_up.weight": (1280, 4),
        "lora_unet_output_blocks_0_1_transformer_blocks_9_attn1_to_out_0.lora_up.weight": (1280, 4),
        "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_k.lora_down.weight": (4, 2048),
        "lora_te1_text_model_encoder_layers_11_self_attn_out_proj.lora_down.weight": (4, 768),
        "lora_te2_text_model_encoder_layers_31_self_attn_q_proj.lora_up.weight": (1280, 4),
    }.items():
        assert shapes.get(key) == shape, key
    modules = {k.split(".")[0] for k in tensors}
    # 70 transformer blocks (2x2 + 2x10 down, 10 mid, 3x10 + 3x2 up) x 2 attentions x q, k, v, out
    assert sum(m.startswith("lora_unet_") for m in modules) == 70 * 2 * 4
    assert sum(m.startswith("lora_te1_") for m in modules) == 12 * 4 and sum(m.startswith("lora_te2_") for m in modules) == 32 * 4
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_te1_", "lora_te2_")) for k in tensors)


def test_embedding_and_hypernetwork_layouts_on_sdxl(sdxl):
    vectors = {"text_encoder": torch.zeros(3, 768), "text_encoder_2": torch.zeros(3, 1280)}
    assert {k: tuple(v.shape) for k, v in file_tensors(sdxl, vectors).items()} == {"clip_l": (3, 768),
                                                                                  "clip_g": (3, 1280)}
    assert set(bundle_tensors(sdxl, "ohwx", vectors)) == {"bundle_emb.ohwx.clip_l", "bundle_emb.ohwx.clip_g"}
    assert context_widths(sdxl.unet) == [2048, 640, 1280]  # cross-attention first, as A1111 keys them


# --- on tiny-xl --------------------------------------------------------------------------------------

RECIPES = {"lora": ("tiny-xl-lora", ["lora.train_text_encoder=true", "train.text_encoder_2_lr=1e-3"]),
           "dreambooth": ("tiny-xl-dreambooth", []), "ti": ("tiny-xl-ti", []), "pivotal": ("tiny-xl-pivotal", []),
           "hypernetwork": ("tiny-xl-hypernetwork", []), "loha": ("tiny-loha", ["base.model='tiny-xl'"])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, subject_dir):
    return trained_once(tmp_path_factory.mktemp("sdxl"), subject_dir, RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_every_method_trains_on_sdxl_and_reloads_as_a_user_loads_it(name, runs):
    run, trained, _ = runs(name)
    end = next(e for e in run.events() if e["event"] == "end")
    assert end["loss_after"] < end["loss_before"], end
    expected = image(trained.pipeline(), PROMPT)
    _, pipe = load_run_model(run)  # our sampler, the way `dreamloom eval` and try-it load it
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert np.abs(image(pipe, PROMPT) - expected).max() < 1e-4
    assert np.abs(image(load_base("tiny-xl").pipeline(), PROMPT) - expected).max() > 1e-3


@pytest.mark.parametrize("name", [n for n in RECIPES if n != "dreambooth"])  # a full model is a base, not tried on one
def test_try_it_puts_every_sdxl_export_on_the_base_and_takes_it_off(name, runs):
    from dreamloom.studio.library import run_exports
    from helpers import compare

    run, _, _ = runs(name)
    base = load_base("tiny-xl")
    tried = [e for e in run_exports(run) if e.try_it]
    assert tried, name
    for export in tried:
        alone, with_it = compare(base, export.path, export.try_it, 1.0, export.prompt, seed=1, steps=4)
        again, without = compare(base, export.path, export.try_it, 0.0, export.prompt, seed=1, steps=4)
        assert alone.tobytes() == again.tobytes(), export.path  # taken off again: the shared base is untouched
        assert alone.tobytes() != with_it.tobytes(), export.path


def diffusers_pipe():
    base = load_base("tiny-xl")
    return base, base.pipeline()


def test_lora_files_load_in_diffusers_own_sdxl_loader(runs):
    _, trained, exports = runs("lora")
    expected = image(trained.pipeline(), PROMPT)
    tensors = load_file(exports[0])
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)  # the original layout's names
    assert any(k.startswith("lora_te2_") for k in tensors) and any(k.startswith("lora_te1_") for k in tensors)
    with safe_open(exports[0], "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "tiny-xl" and meta["modelspec.architecture"] == "dreamloom-tiny-xl/lora"
    for path in exports:  # kohya (diffusers converts the original names itself) and diffusers' own file
        _, pipe = diffusers_pipe()
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        assert np.abs(image(pipe, PROMPT) - expected).max() < 1e-4, path


def test_embeddings_load_into_both_text_encoders_with_diffusers(runs):
    _, trained, exports = runs("ti")
    expected = image(trained.pipeline(), PROMPT)
    tensors = load_file(exports[0])
    assert set(tensors) == {"clip_l", "clip_g"} and (tensors["clip_l"].shape[1], tensors["clip_g"].shape[1]) == (32, 48)
    _, pipe = diffusers_pipe()
    pipe.load_textual_inversion(tensors["clip_l"], token="sks", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(tensors["clip_g"], token="sks", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    assert np.abs(image(pipe, PROMPT) - expected).max() < 1e-4


def test_dreambooth_single_file_and_folder_are_sdxl_checkpoints(runs):
    run, trained, exports = runs("dreambooth")
    expected = image(trained.pipeline(), PROMPT)
    single, folder = exports
    with safe_open(single, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "conditioner.embedders.1.model.text_projection" in keys and "model.diffusion_model.label_emb.0.0.weight" in keys
    assert meta["modelspec.architecture"] == "dreamloom-tiny-xl"
    for path in (single, folder):  # from_single_file with a local config / from_pretrained, never the hub
        base = load_base(str(path))
        assert base.arch.name == "tiny-xl"
        assert np.abs(image(base.pipeline(), PROMPT) - expected).max() < 1e-3, path  # fp16 export


def test_a_lora_of_one_family_is_refused_on_the_other(runs, tmp_path, subject_dir, capsys):
    _, _, xl_exports = runs("lora")
    _, _, sd_exports = train_tiny(tmp_path, subject_dir, ["train.steps=2"])
    for lora, base, families in ((sd_exports[0], "tiny-xl", ("SD 1.x", "SDXL")), (xl_exports[0], "tiny", ("SDXL", "SD 1.x"))):
        assert main(["sample", "--base", base, "--lora", str(lora), "--prompt", "x",
                     "--out", str(tmp_path / "g.png")]) == 2
        err = capsys.readouterr().err
        assert str(lora) in err and "does not fit" in err and all(f in err for f in families), err


def test_an_embedding_of_one_family_is_refused_on_the_other(runs, tmp_path, subject_dir, capsys):
    _, _, xl_exports = runs("ti")
    _, _, sd_exports = train_tiny(tmp_path, subject_dir, ["train.steps=2"], recipe="tiny-ti")
    for embedding, base, words in ((xl_exports[0], "tiny", ["made for SDXL", "clip_l", "SD 1.x"]),
                                   (sd_exports[0], "tiny-xl", ["one set of vectors", "SDXL", "clip_g"])):
        assert main(["sample", "--base", base, "--embedding", str(embedding), "--prompt", "x",
                     "--out", str(tmp_path / "g.png")]) == 2
        err = capsys.readouterr().err
        assert str(embedding) in err and all(w in err for w in words), err


def test_an_sdxl_recipe_at_512_px_says_sdxl_was_trained_at_1024(subject_dir):
    recipe = resolve_recipe("sdxl-lora-12gb", ["data.resolution=512", "data.min_image_size=32",
                                               "train.mixed_precision='no'"],
                            {"data.path": str(subject_dir), "base.model": "random:sdxl"})
    with pytest.warns(UserWarning, match="data.resolution = 512: sdxl was trained at 1024 px"):
        check_run_inputs(recipe)


def test_a1111_pt_embeddings_are_refused_for_sdxl(subject_dir, tmp_path, capsys):
    assert main(["train", "tiny-xl-ti", "--data", str(subject_dir), "--out", str(tmp_path / "runs"),
                 "--set", "export.formats=['a1111', 'a1111_pt']"]) == 2
    err = capsys.readouterr().err
    assert "a1111_pt" in err and "clip_l and clip_g" in err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("crop, flip", [("center", False), ("random", True)])
def test_size_conditioning_is_each_pictures_real_size_and_crop(tmp_path, crop, flip):
    from PIL import Image

    from dreamloom.datasets import load_items
    from dreamloom.trainers.data import TrainingData

    Image.new("RGB", (120, 80), "red").save(tmp_path / "wide.png")  # resized to 96 x 64 for a 64 px crop
    sets = [f"data.crop='{crop}'", f"data.flip={str(flip).lower()}", "train.batch_size=1"]
    recipe = resolve_recipe("tiny-xl-lora", sets, {"data.path": str(tmp_path)})
    items = load_items(tmp_path, trigger="sks", class_word="star", min_image_size=32)
    base = load_base("tiny-xl")
    data = TrainingData(items, recipe, base)
    seen = set()
    for step in range(12):
        batch = data.batch(step)
        assert batch.original_size.tolist() == [[80, 120]]  # (height, width), as SDXL was trained
        top, left = batch.crop_top_left.tolist()[0]
        assert top == 0 and 0 <= left <= 32
        seen.add(left)
        cond = base.family.encode(base, batch.tokens)
        time_ids = base.family.unet_kwargs(cond, batch.original_size, batch.crop_top_left,
                                           (64, 64))["added_cond_kwargs"]["time_ids"]
        assert time_ids.tolist() == [[80, 120, top, left, 64, 64]]
    assert seen == {16} if crop == "center" else len(seen) > 2


def test_sample_on_an_sdxl_single_file_with_every_kind_of_adapter(runs, tmp_path, capsys):
    from PIL import Image

    _, _, (single, _) = runs("dreambooth")
    (lora, *_), (embedding, *_), (hypernetwork, *_) = (runs(n)[2] for n in ("lora", "ti", "hypernetwork"))
    out = tmp_path / "grid.png"
    args = ["sample", "--base", str(single), "--lora", f"{lora}:0.8", "--embedding", str(embedding),
            "--hypernetwork", str(hypernetwork), "--prompt", "a photo of sks star", "--steps", "3", "--n", "2",
            "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    assert Image.open(out).size == (2 * 64, 64)  # the base's own size by default (tiny-xl's 64 px, SDXL's 1024)
    assert main([*args[:-2], "--width", "96", "--height", "48", "--out", str(tmp_path / "wide.png")]) == 0
    assert Image.open(tmp_path / "wide.png").size == (2 * 96, 48)
