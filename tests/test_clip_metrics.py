"""CLIP-T / CLIP-I / DINO for runs on real bases, on tiny random models saved like real ones."""

from __future__ import annotations

import pytest
from PIL import Image

from dreamloom.cli import main
from dreamloom.clip_metrics import clip_scores, dino_score
from dreamloom.errors import DreamloomError
from helpers import train_tiny


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from dreamloom.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("dino")
    ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       image_size=32, patch_size=8)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_scores_are_cosines_and_a_picture_matches_itself(clip_folder, dino_folder):
    red, blue = Image.new("RGB", (48, 48), (220, 30, 30)), Image.new("RGB", (48, 48), (30, 30, 220))
    scores = clip_scores(str(clip_folder), [red], ["a red square"], [red])
    assert scores["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= scores["clip_t"] <= 1.0
    assert clip_scores(str(clip_folder), [red], ["a red square"], [blue])["clip_i"] < 1.0 - 1e-4
    assert dino_score(str(dino_folder), [red], [red]) == pytest.approx(1.0, abs=1e-5)


def test_eval_of_a_real_base_run_prints_clip_scores(tmp_path, subject_dir, clip_folder, dino_folder, capsys):
    run, _, _ = train_tiny(tmp_path, subject_dir, ["train.steps=2", "sample.images_per_prompt=1"])
    assert main(["eval", str(run.path), "--clip", str(clip_folder), "--dino", str(dino_folder)]) == 0
    out = capsys.readouterr().out
    assert "CLIP-T" in out and "CLIP-I" in out and "DINO" in out
    # Without --clip, a run on a real (non-toy) base gets told what to pass.
    assert main(["eval", str(run.path)]) == 2
    assert "--clip" in capsys.readouterr().err


def test_a_missing_clip_model_is_a_clear_error(tmp_path):
    with pytest.raises(DreamloomError, match="could not load the CLIP model"):
        clip_scores(str(tmp_path / "nope"), [Image.new("RGB", (8, 8))], ["x"], [Image.new("RGB", (8, 8))])
