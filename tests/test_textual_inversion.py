"""Textual inversion on the tiny base: learning, only the new rows change, exports that diffusers'
own `load_textual_inversion` reloads exactly, the sampler and CLI, SD 2.x widths, and bad input."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from dreamloom.cli import main
from dreamloom.errors import AdapterError, RecipeError
from dreamloom.export.embeddings import save_a1111_pt, save_a1111_safetensors, save_diffusers_embedding
from dreamloom.models import ARCHS, build_random, load_base
from dreamloom.models.base import text_encoder_config
from dreamloom.models.tokenizer import build_tokenizer
from dreamloom.recipes import resolve_recipe
from dreamloom.sampling.embeddings import attach_embeddings
from dreamloom.models.embedding import TriggerEmbedding, init_vectors
from dreamloom.trainers.textual_inversion import TextualInversionMethod
from helpers import image, train_tiny

PROMPT = "a photo of sks"
QUICK_SAMPLES = ["sample.steps=2", "sample.images_per_prompt=1"]  # end-of-run samples: not what these test
INFO = {"name": "mystyle", "step": 1, "sd_checkpoint": None, "sd_checkpoint_name": "random:sd21"}


@pytest.fixture(scope="module")
def ti_run(tmp_path_factory, subject_dir):
    """tiny-ti as shipped: 16 vectors from 'star', object templates, fp32 exports."""
    return train_tiny(tmp_path_factory.mktemp("runs"), subject_dir, QUICK_SAMPLES, recipe="tiny-ti")


def prompt_embeds(pipe, prompt: str = PROMPT) -> torch.Tensor:
    return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def test_learns_and_only_the_new_rows_change(ti_run):
    run, trained, _ = ti_run
    events = run.events()
    end = next(e for e in events if e["event"] == "end")
    # A few token vectors pass through the text encoder's final LayerNorm, which bounds how far they can move
    # the tiny random UNet (a LoRA gets 15%); the loss is measured on fixed noise, so this is exact.
    assert end["loss_after"] < 0.985 * end["loss_before"], end
    assert next(e for e in events if e["event"] == "start")["trainable_params"] == 16 * 32

    fresh = load_base("tiny")
    for part in ("unet", "vae"):
        before, after = getattr(fresh, part).state_dict(), getattr(trained, part).state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), part
    after = {k.replace("token_embedding.frozen.", "token_embedding."): v
             for k, v in trained.text_encoder.state_dict().items() if not k.endswith("token_embedding.vectors")}
    before = fresh.text_encoder.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"text_encoder.{key} changed"

    embedding = trained.text_encoder.get_input_embeddings()
    assert isinstance(embedding, TriggerEmbedding)
    old = fresh.text_encoder.get_input_embeddings().weight
    matrix = embedding.matrix()  # the whole matrix, as a model with the embedding loaded has it
    assert matrix.shape == (old.shape[0] + 16, 32) and torch.equal(matrix[:old.shape[0]], old)
    star = old[fresh.tokenizer.convert_tokens_to_ids("star</w>")]
    assert all(not torch.allclose(row, star) for row in matrix[old.shape[0]:])  # every new row trained
    names = ["sks"] + [f"sks_{i}" for i in range(1, 16)]
    assert trained.tokenizer.convert_tokens_to_ids(names) == list(range(old.shape[0], old.shape[0] + 16))
    assert all(m.gradient_checkpointing for m in trained.text_encoder.encoder.layers)  # the recipe asks for it


def test_export_files_have_the_a1111_and_diffusers_layouts(ti_run):
    run, trained, exports = ti_run
    assert [p.relative_to(run.exports).as_posix() for p in exports] == [
        "sks.safetensors", "sks.pt", "diffusers/learned_embeds.safetensors"]
    vectors = trained.text_encoder.get_input_embeddings().vectors.detach()
    a1111 = load_file(exports[0])
    assert list(a1111) == ["emb_params"] and torch.equal(a1111["emb_params"], vectors)
    pt = torch.load(exports[1], map_location="cpu", weights_only=True)  # A1111 and ComfyUI load it this way
    assert pt.keys() == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert pt["name"] == "sks" and pt["step"] == 100 and pt["string_to_token"] == {"*": 265}
    assert torch.equal(pt["string_to_param"]["*"], vectors) and pt["sd_checkpoint_name"] == "tiny"
    diffusers = load_file(exports[2])
    assert list(diffusers) == ["sks"] and torch.equal(diffusers["sks"], vectors)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["a1111", "a1111_pt", "diffusers"])
def test_each_export_reloads_in_diffusers_to_the_same_model(ti_run, which):
    _, trained, exports = ti_run
    path = exports[which]
    fresh = load_base("tiny")
    pipe = fresh.pipeline()
    if which == 0:  # A1111's word is the file name; diffusers needs it spelled out for an `emb_params` file
        pipe.load_textual_inversion(str(path), token="sks")
    elif which == 1:  # the .pt names itself
        pipe.load_textual_inversion(str(path))
    else:  # the diffusers folder, as `load_textual_inversion` finds it
        pipe.load_textual_inversion(str(path.parent))
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight,
                       trained.text_encoder.get_input_embeddings().matrix())
    assert torch.equal(prompt_embeds(pipe), prompt_embeds(trained.pipeline()))
    expected = image(trained.pipeline(), PROMPT)
    assert np.abs(image(pipe, PROMPT) - expected).max() < 1e-5
    assert np.abs(image(load_base("tiny").pipeline(), PROMPT) - expected).max() > 1e-3  # the embedding matters


def test_sampler_reads_every_format_and_the_cli_draws_with_it(ti_run, tmp_path, capsys):
    _, trained, exports = ti_run
    for path in (exports[0], exports[1], exports[2].parent):
        base = load_base("tiny")
        pipe = base.pipeline()
        assert attach_embeddings(pipe, base, [path]) == ["sks"]
        assert torch.equal(prompt_embeds(pipe), prompt_embeds(trained.pipeline()))

    grids = {}
    for name, extra in (("base", []), ("a1111", ["--embedding", str(exports[0])]),
                        ("pt", ["--embedding", str(exports[1])]), ("diffusers", ["--embedding", str(exports[2])])):
        grids[name] = tmp_path / f"{name}.png"
        assert main(["sample", "--base", "tiny", "--prompt", PROMPT, "--steps", "3", "--out", str(grids[name]),
                     *extra]) == 0, capsys.readouterr().err
    pixels = {k: np.asarray(Image.open(p)) for k, p in grids.items()}
    assert np.array_equal(pixels["a1111"], pixels["pt"]) and np.array_equal(pixels["a1111"], pixels["diffusers"])
    assert not np.array_equal(pixels["base"], pixels["a1111"])


def test_reexport_through_the_cli(ti_run, capsys):
    run, _, exports = ti_run
    before = load_file(exports[0])
    assert main(["export", str(run.path), "--format", "a1111"]) == 2  # never over the user's file
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(run.path), "--format", "a1111", "--overwrite"]) == 0
    assert capsys.readouterr().out.strip() == f"export: {exports[0]}"
    assert torch.equal(load_file(exports[0])["emb_params"], before["emb_params"])
    assert main(["export", str(run.path), "--format", "kohya"]) == 2  # another method's format
    assert "textual_inversion runs export a1111, a1111_pt, diffusers; not kohya" in capsys.readouterr().err


def test_cli_shortcuts_set_the_embedding_keys(tmp_path, subject_dir, capsys):
    out = tmp_path / "runs"
    quick = [a for s in QUICK_SAMPLES for a in ("--set", s)]
    assert main(["train", "tiny-ti", "--data", str(subject_dir), "--trigger", "zwx", "--init-word", "toy",
                 "--vectors", "2", "--steps", "2", "--out", str(out), *quick]) == 0
    printed = capsys.readouterr().out
    assert "export: " in printed and "zwx.safetensors" in printed
    run_dir = next(out.iterdir())
    recipe = (run_dir / "recipe.toml").read_text()
    assert 'init_word = "toy"' in recipe and "vectors = 2" in recipe
    assert load_file(run_dir / "exports" / "zwx.safetensors")["emb_params"].shape == (2, 32)


def test_sd2_embeddings_are_1024_wide_and_load_into_an_sd2_text_encoder(tmp_path):
    """random:sd21 itself is 1.3B parameters: its UNet and VAE are built on the meta device (shapes only),
    and its text encoder at full width (1024, real vocabulary) but one layer deep instead of 23."""
    sd21 = build_random(ARCHS["sd21"], meta=True)
    config = text_encoder_config(ARCHS["sd21"])
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    pristine = CLIPTextModel(config).eval()
    trained = dataclasses.replace(sd21, text_encoder=copy.deepcopy(pristine))
    recipe = resolve_recipe("tiny-ti", ["base.model='random:sd21'", "data.trigger='mystyle'",
                                        "textual_inversion.vectors=3", "textual_inversion.init_word='painting'"])
    TextualInversionMethod(recipe).prepare(trained)
    vectors = trained.text_encoder.get_input_embeddings().vectors
    assert vectors.shape == (3, 1024)
    with torch.no_grad():
        vectors.add_(torch.randn(3, 1024))  # stands in for training
    files = [save_a1111_safetensors(tmp_path / "mystyle.safetensors", vectors, INFO, trained),
             save_a1111_pt(tmp_path / "mystyle.pt", vectors, INFO),
             save_diffusers_embedding(tmp_path / "learned_embeds.safetensors", "mystyle", vectors, INFO, trained)]
    assert load_file(files[0])["emb_params"].shape == (3, 1024)
    prompt = "a castle in mystyle style"
    expected = prompt_embeds(trained.pipeline(), prompt)
    for path in files:
        fresh = dataclasses.replace(sd21, text_encoder=copy.deepcopy(pristine), tokenizer=build_tokenizer())
        pipe = fresh.pipeline()
        assert attach_embeddings(pipe, fresh, [path]) == ["mystyle"]
        torch.testing.assert_close(prompt_embeds(pipe, prompt), expected, rtol=0, atol=1e-6)

    tiny = load_base("tiny")
    with pytest.raises(AdapterError, match=r"mystyle.safetensors' has vectors 1024 wide \(made for SD 2.x\), but the "
                                           r"text encoder of base 'tiny' is 32 wide"):
        attach_embeddings(tiny.pipeline(), tiny, [files[0]])


@pytest.mark.parametrize("trigger", ["star", "x"])
def test_a_trigger_the_tokenizer_knows_is_refused_before_any_run(trigger, tmp_path, subject_dir, capsys):
    out = tmp_path / "runs"
    assert main(["train", "tiny-ti", "--data", str(subject_dir), "--trigger", trigger, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"data.trigger = '{trigger}'" in err and ("allow_known_trigger" in err or "already has the token" in err)
    assert not out.exists()


def test_a_known_trigger_is_warned_when_allowed():
    recipe = resolve_recipe("tiny-ti", ["data.trigger='star'", "textual_inversion.allow_known_trigger=true"])
    with pytest.warns(UserWarning, match="takes that meaning away"):
        TextualInversionMethod(recipe)


@pytest.mark.parametrize("added", ["sks", "sks_3"])
def test_a_trigger_that_collides_with_an_added_token_is_refused(added):
    base = load_base("tiny")  # e.g. a model folder saved with another embedding loaded
    base.tokenizer.add_tokens([added])
    method = TextualInversionMethod(resolve_recipe("tiny-ti"))
    with pytest.raises(RecipeError, match=rf"already has the token\(s\) \['{added}'\]"):
        method.prepare(base)


@pytest.mark.parametrize("trigger", ["My Style", "MyStyle", "a/b"])
def test_a_trigger_must_be_one_lowercase_word(trigger):
    with pytest.raises(RecipeError, match="one lowercase word"):
        TextualInversionMethod(resolve_recipe("tiny-ti", [f"data.trigger='{trigger}'"]))


@pytest.mark.parametrize("vectors", [0, 17])
def test_vectors_out_of_range_name_the_key(vectors, tmp_path, subject_dir, capsys):
    with pytest.raises(RecipeError, match="textual_inversion.vectors"):
        resolve_recipe("tiny-ti", [f"textual_inversion.vectors={vectors}"])
    assert main(["train", "tiny-ti", "--data", str(subject_dir), "--vectors", str(vectors),
                 "--out", str(tmp_path / "runs")]) == 2
    assert "textual_inversion.vectors" in capsys.readouterr().err


def test_an_init_word_of_several_tokens_is_laid_across_the_vectors():
    """The documented choice (A1111's): vector i starts from token i*k//n of the word's k tokens."""
    base = load_base("tiny")
    matrix = base.text_encoder.get_input_embeddings().weight
    ids = base.tokenizer("mystyle", add_special_tokens=False).input_ids
    assert base.tokenizer.convert_ids_to_tokens(ids) == ["m", "y", "style</w>"]
    assert torch.equal(init_vectors(base.tokenizer, matrix, "mystyle", 3), matrix[ids])  # the whole word
    assert torch.equal(init_vectors(base.tokenizer, matrix, "mystyle", 6), matrix[[ids[i * 3 // 6] for i in range(6)]])
    with pytest.warns(UserWarning, match=r"'mystyle' is 3 tokens \['m', 'y', 'style</w>'\].*tokens \[0\] only"):
        assert torch.equal(init_vectors(base.tokenizer, matrix, "mystyle", 1), matrix[ids[:1]])


def test_sampler_refuses_files_it_cannot_use(tmp_path):
    base = load_base("tiny")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(AdapterError, match="xl.safetensors' holds clip_l and clip_g: it was made for SDXL"):
        attach_embeddings(base.pipeline(), base, [tmp_path / "xl.safetensors"])
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": NotATensor()}, tmp_path / "unsafe.pt")
    with pytest.raises(AdapterError, match="unsafe.pt' cannot be read as a textual-inversion embedding"):
        attach_embeddings(base.pipeline(), base, [tmp_path / "unsafe.pt"])
    with pytest.raises(AdapterError, match="does not exist"):
        attach_embeddings(base.pipeline(), base, [tmp_path / "missing.safetensors"])
    save_file({"emb_params": torch.zeros(2, 768)}, tmp_path / "sd15.safetensors")
    with pytest.raises(AdapterError, match=r"768 wide \(made for SD 1.x\).*'tiny' is 32 wide"):
        attach_embeddings(base.pipeline(), base, [tmp_path / "sd15.safetensors"])


class NotATensor:
    """A pickled object that `torch.load(weights_only=True)` must refuse to build."""
