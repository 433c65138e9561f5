"""Pivotal tuning on the tiny base: LoRA and embedding both train, the bundled LoRA file and the
separate files give the trained model's image, re-export and SIGKILL resume are exact."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from dreamloom.cli import main
from dreamloom.errors import RecipeError
from dreamloom.models import load_base
from dreamloom.recipes import resolve_recipe
from dreamloom.sampling import attach_loras
from dreamloom.sampling.embeddings import attach_embeddings
from dreamloom.trainers.pivotal import PivotalMethod
from dreamloom.trainers.textual_inversion import TextualInversionMethod
from dreamloom.trainers.run import export_run
from helpers import PROMPT, base_weights, image, train_tiny

QUICK_SAMPLES = ["sample.steps=2", "sample.images_per_prompt=1"]
BUNDLE = "bundle_emb.sks.string_to_param.*"


@pytest.fixture(scope="module")
def piv_run(tmp_path_factory, subject_dir):
    """tiny-pivotal as shipped: LoRA rank 4 / alpha 8 on the UNet, 4 vectors from 'star', fp32 exports."""
    return train_tiny(tmp_path_factory.mktemp("runs"), subject_dir, QUICK_SAMPLES, recipe="tiny-pivotal")


def test_both_parts_train_and_base_weights_stay(piv_run):
    run, trained, exports = piv_run
    end = next(e for e in run.events() if e["event"] == "end")
    assert end["loss_after"] < 0.85 * end["loss_before"], end

    fresh = load_base("tiny")
    for part in ("unet", "vae"):
        before, after = base_weights(getattr(fresh, part)), base_weights(getattr(trained, part))
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), part
    lora_up = [p for n, p in trained.unet.named_parameters() if "lora_B" in n]
    assert lora_up and all(p.abs().sum() > 0 for p in lora_up)  # B starts at zero: all trained
    embedding = trained.text_encoder.get_input_embeddings()
    old = fresh.text_encoder.get_input_embeddings().weight
    assert torch.equal(embedding.frozen.weight, old)  # every old row as it was
    star = old[fresh.tokenizer.convert_tokens_to_ids("star</w>")]
    assert embedding.vectors.shape == (4, 32) and all(not torch.allclose(v, star) for v in embedding.vectors)


def test_export_files(piv_run):
    run, trained, exports = piv_run
    assert [p.relative_to(run.exports).as_posix() for p in exports] == [
        "sks-pivotal.safetensors", "sks-pivotal-lora.safetensors", "diffusers/pytorch_lora_weights.safetensors",
        "sks.safetensors", "sks.pt", "diffusers/learned_embeds.safetensors"]
    bundle, lora = load_file(exports[0]), load_file(exports[1])
    vectors = trained.text_encoder.get_input_embeddings().vectors.detach()
    assert torch.equal(bundle.pop(BUNDLE), vectors) and not any(k.startswith("bundle_emb.") for k in lora)
    assert bundle.keys() == lora.keys() and all(torch.equal(bundle[k], lora[k]) for k in lora)
    assert all(k.startswith("lora_unet_") for k in lora)
    assert torch.equal(load_file(exports[3])["emb_params"], vectors)
    with safe_open(exports[0], "pt") as f:
        assert f.metadata()["modelspec.trigger_phrase"] == "sks"
    for path in exports[:2]:  # each file names itself in the UIs' lists
        with safe_open(path, "pt") as f:
            assert f.metadata()["ss_output_name"] == f.metadata()["modelspec.title"] == path.stem


def test_bundled_and_separate_files_give_the_trained_image(piv_run):
    _, trained, exports = piv_run
    expected = image(trained.pipeline(), PROMPT)

    base = load_base("tiny")
    pipe = base.pipeline()
    attach_loras(pipe, base, [(exports[0], 1.0)])  # the bundle: LoRA and embedding from one file
    assert np.abs(image(pipe, PROMPT) - expected).max() < 1e-4

    base = load_base("tiny")
    pipe = base.pipeline()
    attach_loras(pipe, base, [(exports[1], 1.0)])
    attach_embeddings(pipe, base, [exports[4]])  # the kohya LoRA and the A1111 .pt
    assert np.abs(image(pipe, PROMPT) - expected).max() < 1e-4

    base = load_base("tiny")
    pipe = base.pipeline()  # diffusers' own loaders on the diffusers files
    pipe.load_lora_weights(str(exports[2].parent), weight_name=exports[2].name)
    pipe.load_textual_inversion(str(exports[5].parent))
    assert np.abs(image(pipe, PROMPT) - expected).max() < 1e-4

    base = load_base("tiny")
    pipe = base.pipeline()
    attach_loras(pipe, base, [(exports[1], 1.0)])  # the LoRA without its embedding is another model
    assert np.abs(image(pipe, PROMPT) - expected).max() > 1e-3


def test_sample_cli_reads_the_bundle(piv_run, tmp_path, capsys):
    _, _, exports = piv_run
    grids = {}
    for name, extra in (("bundle", ["--lora", str(exports[0])]),
                        ("separate", ["--lora", str(exports[1]), "--embedding", str(exports[3])])):
        grids[name] = tmp_path / f"{name}.png"
        assert main(["sample", "--base", "tiny", "--prompt", PROMPT, "--steps", "3", "--out", str(grids[name]),
                     *extra]) == 0, capsys.readouterr().err
    assert np.array_equal(*(np.asarray(Image.open(p)) for p in grids.values()))


def test_reexport_from_the_checkpoint_is_identical(piv_run):
    run, _, exports = piv_run
    files = [p for p in exports if p.suffix == ".safetensors"]
    before = [load_file(p) for p in files]
    again = export_run(run.path, overwrite=True)  # a fresh base, prepared, with the checkpoint loaded
    assert again == exports
    for path, old in zip(files, before):
        new = load_file(path)
        assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old), path.name


def test_output_name_may_not_be_the_trigger():
    with pytest.raises(RecipeError, match="export.output_name = 'sks' is the trigger"):
        PivotalMethod(resolve_recipe("tiny-pivotal", ["export.output_name='sks'"]))


def test_prior_preservation_only_where_it_means_something():
    PivotalMethod(resolve_recipe("tiny-pivotal", ["prior.enabled=true"]))  # captions: class prompts stay
    with pytest.raises(RecipeError, match="templates would replace the class images' prompts"):
        PivotalMethod(resolve_recipe("tiny-pivotal", ["prior.enabled=true", "textual_inversion.template='object'"]))
    with pytest.raises(RecipeError, match="nothing to preserve"):
        TextualInversionMethod(resolve_recipe("tiny-ti", ["prior.enabled=true"]))
