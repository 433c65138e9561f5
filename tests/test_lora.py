"""LoRA end to end on the tiny base: learning, exact base weights, exports that reload."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreamloom.errors import DreamloomError
from dreamloom.models import load_base
from dreamloom.sampling import attach_loras
from dreamloom.trainers.run import export_run
from helpers import base_weights, image, train_tiny


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory, subject_dir):
    """The tiny-lora recipe as shipped (rank 4, alpha 8: alpha != rank on purpose)."""
    return train_tiny(tmp_path_factory.mktemp("runs"), subject_dir, ["train.sample_every=50"])


@pytest.fixture(scope="module")
def te_run(tmp_path_factory, subject_dir):
    return train_tiny(tmp_path_factory.mktemp("runs"), subject_dir,
                      ["train.steps=30", "lora.train_text_encoder=true", "lora.rank=2", "lora.alpha=5"])


def test_lora_learns_and_leaves_base_weights_untouched(unet_run):
    run, trained, _ = unet_run
    end = next(e for e in run.events() if e["event"] == "end")
    assert end["loss_after"] < 0.85 * end["loss_before"], end

    fresh = load_base("tiny")
    for part in ("unet", "vae", "text_encoder"):
        before, after = base_weights(getattr(fresh, part)), base_weights(getattr(trained, part))
        assert before.keys() == after.keys()
        for key in before:
            assert torch.equal(before[key], after[key]), f"{part}.{key} changed"
    lora_up = [p for n, p in trained.unet.named_parameters() if "lora_B" in n]
    assert lora_up and all(p.abs().sum() > 0 for p in lora_up)  # B starts at zero: all trained
    assert not any("lora_" in n for n, _ in trained.text_encoder.named_parameters())


def test_events_and_samples_are_written(unet_run):
    run, _, _ = unet_run
    events = run.events()
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and "error" not in kinds
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(10, 101, 10))  # every train.log_every (10) steps
    assert {"loss", "lr", "it_s", "images_s", "peak_mem_mb"} <= steps[0].keys()
    samples = [e for e in events if e["event"] == "sample"]
    assert [e["step"] for e in samples] == [50, 100]
    assert all((run.path / "samples" / f"step-{s['step']:08d}.png").is_file() for s in samples)
    assert run.checkpoint_steps() == [80, 100]  # every 20 steps, the last two kept


@pytest.mark.parametrize("which", [0, 1], ids=["kohya", "diffusers"])
@pytest.mark.parametrize("run_name", ["unet_run", "te_run"])
def test_export_reloads_to_the_same_image(request, run_name, which):
    _, trained, exports = request.getfixturevalue(run_name)
    expected = image(trained.pipeline())
    base = load_base("tiny")
    pipe = base.pipeline()
    attach_loras(pipe, base, [(exports[which], 1.0)])  # diffusers' own load_lora_weights inside
    assert np.abs(image(pipe) - expected).max() < 1e-4
    assert np.abs(image(load_base("tiny").pipeline()) - expected).max() > 1e-2  # the LoRA matters


def test_kohya_file_layout(te_run):
    run, _, exports = te_run
    tensors = load_file(exports[0])
    with safe_open(exports[0], "pt") as f:
        meta = f.metadata()
    unet_key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    te_key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert tensors[f"{unet_key}.lora_down.weight"].shape == (2, 32)
    assert tensors[f"{unet_key}.lora_up.weight"].shape == (32, 2)
    assert tensors[f"{te_key}.lora_down.weight"].shape == (2, 32)
    assert tensors[f"{te_key}.alpha"].item() == 5.0 and tensors[f"{unet_key}.alpha"].item() == 5.0
    assert not any(k.startswith("lora_te1_") for k in tensors)
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2",
                "ss_output_name", "ss_resolution", "ss_steps", "ss_tag_frequency", "sshs_model_hash",
                "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.title",
                "modelspec.trigger_phrase", "modelspec.prediction_type", "modelspec.resolution"):
        assert key in meta, key
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "5.0"
    assert json.loads(meta["ss_tag_frequency"]) == {run.recipe().data.path.rsplit("/", 1)[-1]: {"a photo of sks star": 4}}


def test_diffusers_file_carries_rank_and_alpha(te_run):
    _, _, exports = te_run
    with safe_open(exports[1], "pt") as f:
        keys, meta = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert any(k.startswith("unet.") and k.endswith("lora_A.weight") for k in keys)
    assert any(k.startswith("text_encoder.") for k in keys)
    assert meta["unet.r"] == 2 and meta["unet.lora_alpha"] == 5.0


def test_strength_zero_is_the_base_image(unet_run):
    _, _, exports = unet_run
    base = load_base("tiny")
    pipe = base.pipeline()
    attach_loras(pipe, base, [(exports[0], 0.0)])
    assert np.abs(image(pipe) - image(load_base("tiny").pipeline())).max() < 1e-5


def test_reexport_refuses_to_overwrite_then_matches(unet_run):
    run, _, exports = unet_run
    original = load_file(exports[0])
    with pytest.raises(DreamloomError, match="already exists"):
        export_run(run.path)
    paths = export_run(run.path, overwrite=True)
    again = load_file(paths[0])
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
