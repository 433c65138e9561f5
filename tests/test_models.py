"""Bases: the tiny one, full-size architectures that match the real models, local folders."""

from __future__ import annotations

import pytest
import torch

from dreamloom.errors import BaseModelError
from dreamloom.models import ARCHS, build_random, load_base
from dreamloom.models.tokenizer import CAPTION_WORDS, build_tokenizer
from helpers import image


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tiny_is_deterministic_and_real_sd_shaped():
    a, b = load_base("tiny"), load_base("tiny")
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.vae.config.scaling_factor == 0.18215
    assert 2 ** (len(a.vae.config.block_out_channels) - 1) == 8  # the real 8x latent downsampling
    assert image(a.pipeline()).shape == (64, 64, 3)


def test_sd15_architecture_matches_the_real_model():
    """Parameter counts of the real SD 1.5, and its diffusers key names/shapes."""
    base = build_random(ARCHS["sd15"], meta=True)
    assert count(base.unet) == 859_520_964
    assert count(base.text_encoder) == 123_060_480
    assert count(base.vae) == 83_653_863
    unet = dict(base.unet.named_parameters())
    assert unet["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert unet["mid_block.attentions.0.proj_in.weight"].shape == (1280, 1280, 1, 1)
    assert unet["conv_in.weight"].shape == (320, 4, 3, 3)
    assert base.text_encoder.get_input_embeddings().weight.shape == (49408, 768)


def test_sd21_architecture_matches_the_real_model():
    base = build_random(ARCHS["sd21"], meta=True)
    assert count(base.unet) == 865_910_724
    assert count(base.text_encoder) == 340_387_840
    unet = dict(base.unet.named_parameters())
    assert unet["down_blocks.0.attentions.0.proj_in.weight"].shape == (320, 320)  # linear projection
    assert unet["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 1024)
    assert base.prediction_type == "v_prediction"


def test_builtin_tokenizer_keeps_caption_words_whole():
    tok = build_tokenizer()
    assert all(len(tok(w).input_ids) == 3 for w in CAPTION_WORDS)  # start, word, end
    assert len(tok("sks").input_ids) > 3  # a rare trigger is spelled in pieces, as in real CLIP
    assert tok.model_max_length == 77


def test_diffusers_folder_loads_back(tmp_path):
    base = load_base("tiny")
    base.pipeline().save_pretrained(tmp_path / "model")
    again = load_base(str(tmp_path / "model"))
    assert again.arch.name == "tiny"
    assert abs(image(again.pipeline()) - image(base.pipeline())).max() < 1e-5


@pytest.mark.parametrize("spec, message", [
    ("random:sd99", "known: random:toy, random:sd15, random:sd21"),
    ("./no/such/folder", "not found"),
])
def test_unknown_bases(spec, message):
    with pytest.raises(BaseModelError, match=message):
        load_base(spec)


def test_folder_that_is_not_a_diffusers_model(tmp_path):
    with pytest.raises(BaseModelError, match="model_index.json"):
        load_base(str(tmp_path))
