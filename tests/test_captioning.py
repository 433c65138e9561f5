"""`dreamloom caption` with tiny random captioners built from their configs (nothing downloaded):
sidecars are written, a user's captions are kept unless --overwrite, bad captioners are refused."""

from __future__ import annotations

import pytest
import torch

from dreamloom.cli import main

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "star", "orange", "photo", "of", "on", "blue"]
TAGS = ["1girl", "red_hair", "smile", "outdoors", "star_(symbol)", "orange_background"]


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    folder = tmp_path_factory.mktemp("blip")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    torch.manual_seed(0)
    config = BlipConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=5, pad_token_id=0,
                         sep_token_id=3, eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=32)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def florence(tmp_path_factory):
    """Florence-2 (transformers' own classes: DaViT vision tower, BART text model), scaled down."""
    import json

    from transformers import BartTokenizer, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor
    from transformers.models.clip import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("florence")
    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>", *WORDS[5:], *"abcdefghijklmnopqrstuvwxyzĠ."])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = BartTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False)
    images.image_seq_length = 5  # 2 x 2 patches after DaViT's 32x reduction, plus the pooled one
    torch.manual_seed(0)
    config = Florence2Config(
        vision_config=dict(depths=[1, 1, 1, 1], embed_dim=[8, 16, 16, 32], num_heads=[1, 1, 1, 2],
                           num_groups=[1, 1, 1, 2], window_size=2, projection_dim=32, drop_path_rate=0.0,
                           max_position_embeddings=8, max_temporal_embeddings=2),
        text_config=dict(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         max_position_embeddings=128, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                         decoder_start_token_id=2),
        image_token_id=tokenizer.image_token_id)
    net = Florence2ForConditionalGeneration(config)
    net.generation_config.min_new_tokens = 3  # random weights would end at once: some words to write
    net.save_pretrained(folder)
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit import ViTImageProcessorPil

    folder = tmp_path_factory.mktemp("tagger")
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                       patch_size=8, id2label=dict(enumerate(TAGS)), problem_type="multi_label_classification")
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture
def data(tmp_path, subject_dir):
    folder = tmp_path / "data"
    folder.mkdir()
    for path in sorted(subject_dir.glob("*.png")):
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "subject-0.txt").write_text("my own caption")
    return folder


@pytest.mark.parametrize("captioner", ["blip", "florence"])
def test_captions_are_written_beside_the_pictures_and_a_users_are_kept(captioner, request, data, capsys):
    model = request.getfixturevalue(captioner)
    assert main(["caption", str(data), "--model", str(model), "--prefix", "sks,"]) == 0
    assert "wrote 3 caption(s)" in capsys.readouterr().out
    assert (data / "subject-0.txt").read_text() == "my own caption"  # never replaced unasked
    written = [(data / f"subject-{i}.txt").read_text() for i in (1, 2, 3)]
    assert all(t.startswith("sks,") and t.endswith("\n") for t in written)
    assert main(["caption", str(data), "--model", str(model), "--overwrite"]) == 0
    assert (data / "subject-0.txt").read_text() != "my own caption"


def test_a_tagger_writes_its_tags_above_the_threshold(tagger, data, capsys):
    assert main(["caption", str(data), "--model", str(tagger), "--mode", "tags", "--threshold", "0.0",
                 "--overwrite"]) == 0
    tags = (data / "subject-1.txt").read_text().strip().split(", ")
    assert sorted(tags) == sorted(t.replace("_", " ") for t in TAGS)  # all of them at threshold 0
    before = (data / "subject-1.txt").read_text()
    assert main(["caption", str(data), "--model", str(tagger), "--mode", "tags", "--threshold", "0.99",
                 "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "lower --threshold" in err and "subject-1.png (the model wrote nothing)" in err
    assert (data / "subject-1.txt").read_text() == before  # nothing came out: nothing replaced


def test_a_folder_that_is_not_a_captioner_is_refused(tmp_path, data, blip, tagger, capsys):
    (tmp_path / "notes").mkdir()
    assert main(["caption", str(data), "--model", str(tmp_path / "notes")]) == 2
    err = capsys.readouterr().err
    assert "not a captioner" in err and "config.json" in err
    assert main(["caption", str(data), "--model", str(blip), "--mode", "tags"]) == 2  # a captioner, not a tagger
    assert "not a captioner for --mode tags" in capsys.readouterr().err
    assert main(["caption", str(data), "--model", "someone/captioner"]) == 2
    assert "local hub cache" in capsys.readouterr().err
    assert not (data / "subject-1.txt").exists()


def test_the_studio_captions_a_dataset_through_the_job_queue(blip, data, tmp_path):
    from dreamloom.jobs.queue import JobQueue
    from dreamloom.jobs.worker import job_log, run_worker
    from dreamloom.studio import datasets as ds

    queue = JobQueue(tmp_path / "home")
    job_id = ds.caption_job(queue, data, str(blip), "caption", "sks,", overwrite=False)
    assert not (data / "subject-1.txt").exists()  # nothing ran in the studio's process
    run_worker(queue.home, once=True, poll=0.05)
    job = queue.get(job_id)
    assert job.state == "finished", job_log(queue, job_id).read_text()
    assert all((data / f"subject-{i}.txt").read_text().startswith("sks,") for i in (1, 2, 3))
    assert (data / "subject-0.txt").read_text() == "my own caption"
    with pytest.raises(Exception, match="config.json"):
        ds.caption_job(queue, data, str(tmp_path), "caption", "", overwrite=False)


def test_tag_counts_and_removing_a_tag_from_every_caption(tmp_path, subject_dir):
    from dreamloom.studio import datasets as ds

    folder = tmp_path / "tags"
    folder.mkdir()
    for i, caption in enumerate(["sks, red hair, smile", "sks, smile", "sks, red hair, outdoors, smile"]):
        (folder / f"p{i}.png").write_bytes((subject_dir / "subject-0.png").read_bytes())
        (folder / f"p{i}.txt").write_text(caption)
    assert ds.tag_counts(folder) == [("sks", 3), ("smile", 3), ("red hair", 2), ("outdoors", 1)]
    assert ds.remove_tag(folder, "red hair") == 2
    assert (folder / "p2.txt").read_text().strip() == "sks, outdoors, smile"
