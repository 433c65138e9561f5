"""The shared data path: aspect-ratio buckets, several resolutions and folders, tag captions, masked
loss and the validation loss, through TrainingData and the real loop."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from dreamloom.cli import main
from dreamloom.datasets.buckets import bucket_sizes, nearest_bucket
from dreamloom.datasets.images import resized_size
from dreamloom.datasets.sources import recipe_data
from dreamloom.datasets.tags import vary_tags
from dreamloom.models import load_base
from dreamloom.recipes import resolve_recipe
from dreamloom.trainers.data import TrainingData
from dreamloom.trainers.noise_loss import noise_loss
from helpers import train_tiny, write_shaped_images

SHORT = ["train.steps=4", "train.checkpoint_every=2", "train.sample_every=0", "sample.images_per_prompt=1",
         "sample.steps=2"]


def cropped_share(width, height, bucket) -> float:
    covered = resized_size(width, height, bucket)
    return 1 - bucket[0] * bucket[1] / (covered[0] * covered[1])


def test_a_two_to_one_picture_trains_in_a_two_to_one_bucket():
    assert nearest_bucket(2000, 1000, 1024, 64, 2.5, 2.0) == (1408, 704)
    assert nearest_bucket(1000, 2000, 1024, 64, 2.5, 2.0) == (704, 1408)
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 == h % 64 for w, h in bucket_sizes(1024, 64, 2.5))


@pytest.mark.parametrize("resolution", [512, 1024])
def test_the_bucket_crops_least_of_all_and_never_enlarges_past_the_limit(resolution):
    buckets = bucket_sizes(resolution, 64, 2.5)
    for k in range(-40, 41):  # aspect ratios from 1:2.5 to 2.5:1
        width, height = round(1500 * 2.5 ** (k / 40)), 1500
        bucket = nearest_bucket(width, height, resolution, 64, 2.5, 2.0)
        assert cropped_share(width, height, bucket) <= min(cropped_share(width, height, b) for b in buckets) + 1e-9
        assert cropped_share(width, height, bucket) < (0.07 if resolution == 1024 else 0.13)
    small = nearest_bucket(300, 200, 1024, 64, 2.5, 2.0)  # 1024 px buckets would enlarge it 3.4x
    assert max(small[0] / 300, small[1] / 200) <= 2.0 and small[0] > small[1]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return write_shaped_images(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny")


def tiny_data(folder, sets, base):
    recipe = resolve_recipe("tiny-lora", sets, {"data.path": str(folder), "data.min_image_size": 32})
    return TrainingData(recipe_data(recipe).train, recipe, base), recipe


def test_bucketed_batches_share_a_size_and_keep_their_aspect(shapes_dir, tiny):
    data, _ = tiny_data(shapes_dir, ["data.buckets=true", "data.bucket_step=16", "train.batch_size=2"], tiny)
    sizes = {data.examples[e].size for e in range(len(data.examples))}
    assert sizes == {(80, 48), (64, 64), (48, 80)}
    seen = set()
    for step in range(12):
        examples = data.indices(step, 0)
        assert len({data.examples[e].size for e in examples}) == 1  # one bucket per batch
        batch = data.batch(step)
        w, h = data.examples[examples[0]].size
        assert batch.latents.shape[-2:] == (h // 8, w // 8)
        seen.update(examples)
    assert seen == set(range(len(data.examples)))  # every picture trains
    again, _ = tiny_data(shapes_dir, ["data.buckets=true", "data.bucket_step=16", "train.batch_size=2"], tiny)
    assert [again.indices(s, 0) for s in range(12)] == [data.indices(s, 0) for s in range(12)]


def test_several_resolutions_train_every_picture_at_each(shapes_dir, tiny):
    data, _ = tiny_data(shapes_dir, ["data.resolutions=[96]"], tiny)
    assert sorted({e.size for e in data.examples}) == [(64, 64), (96, 96)]
    assert len(data.examples) == 12
    for step in range(6):
        assert data.batch(step).latents.shape[-1] in (8, 12)


def test_kept_tags_stay_in_place_and_the_rest_is_shuffled_and_dropped():
    caption = "sks, star, red, round, shiny, small, outline"
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(30):
        out = vary_tags(caption, g, shuffle=True, keep_tokens=2, dropout=0.2).split(", ")
        assert out[:2] == ["sks", "star"] and set(out[2:]) <= {"red", "round", "shiny", "small", "outline"}
        seen.add(tuple(out))
    assert len(seen) > 10 and any(len(s) < 7 for s in seen)
    fixed = vary_tags("sks, star ||| red, round, shiny ||| masterpiece", g, shuffle=True, keep_separator="|||")
    assert fixed.startswith("sks, star, ") and fixed.endswith(", masterpiece")
    a = [vary_tags(caption, torch.Generator().manual_seed(5), shuffle=True) for _ in range(2)]
    assert a[0] == a[1]  # deterministic per generator, so per step


def test_shuffled_tags_reach_the_batches_with_the_trigger_first(shapes_dir, tiny):
    data, _ = tiny_data(shapes_dir, ["data.shuffle_tags=true", "data.keep_tokens=1"], tiny)
    assert data.cond is None  # captions change every step: encoded as they come
    captions = [data.batch(step).captions[0] for step in range(16)]
    assert all(c.startswith("sks, ") for c in captions)
    assert len({c.split(", ", 1)[1] for c in captions}) > len(set(data.items[i].caption for i in range(6)))


@pytest.mark.parametrize("sets", [[], ["data.buckets=true", "data.bucket_step=16", "data.flip=true"]],
                         ids=["square", "buckets-flipped"])
def test_masked_loss_ignores_what_the_mask_hides(shapes_dir, tiny, sets):
    """No error of the prediction where the mask is black can move the loss, wherever the crop, bucket and
    mirror put the mask: the loss's gradient there is exactly zero. (Pixels under the mask still reach the
    rest through the VAE's and UNet's receptive fields, as in every trainer.)"""
    data, recipe = tiny_data(shapes_dir, ["data.masked_loss=true", *sets], tiny)
    predictions = []

    def keep_grad(module, inputs, out):
        out.sample.retain_grad() if out.sample.requires_grad else out.sample.requires_grad_()
        predictions.append(out.sample)
    hook = tiny.unet.register_forward_hook(keep_grad)
    try:
        for e in range(len(data.examples)):
            batch = data.make_batch([e], torch.Generator().manual_seed(e))
            noise_loss(tiny, batch, recipe.train).backward()
            grad, mask = predictions[-1].grad[0].abs().sum(0), batch.mask[0, 0]
            assert torch.all(grad[mask == 0] == 0) and torch.all(grad[mask == 1] > 0)
            assert 0 < (mask == 0).sum() < mask.numel()  # about a third is hidden: the mask arrived, aligned
    finally:
        hook.remove()
    mirrored = [data.make_batch([0], torch.Generator().manual_seed(k)).mask[0, 0] for k in range(8)]
    if sets:  # with flips the hidden third is on the left or the right, as the picture was mirrored
        assert any(m[:, 0].sum() == 0 for m in mirrored) and any(m[:, -1].sum() == 0 for m in mirrored)


def test_bad_masks_are_reported_with_the_file_before_training(shapes_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"p{i}.png").write_bytes((shapes_dir / f"p{i}.png").read_bytes())
    Image.new("L", (50, 50), 255).save(data / "p0.mask.png")
    Image.new("L", Image.open(data / "p1.png").size, 0).save(data / "p1.mask.png")
    (data / "p2.mask.png").write_bytes(b"not a png")
    out = tmp_path / "runs"
    assert main(["train", "tiny-lora", "--data", str(data), "--out", str(out), "--set", "data.masked_loss=true",
                 "--set", "data.min_image_size=32"]) == 2
    err = capsys.readouterr().err
    assert "p0.mask.png" in err and "50x50" in err
    assert "p1.mask.png" in err and "empty" in err
    assert "p2.mask.png" in err and "readable" in err
    assert not out.exists()


def test_kohya_folders_give_repeats_and_captions(subject_dir, tmp_path):
    root = tmp_path / "kohya"
    for name in ("10_sks star", "2_orange shape"):
        (root / name).mkdir(parents=True)
        for path in list(subject_dir.glob("*.png"))[:2]:
            (root / name / path.name).write_bytes(path.read_bytes())
    recipe = resolve_recipe("tiny-lora", [], {"data.path": str(root)})
    items = recipe_data(recipe).train
    assert sorted((i.repeats, i.caption) for i in items) == [(2, "orange shape")] * 2 + [(10, "sks star")] * 2


def test_a_folder_not_named_repeats_underscore_caption_is_refused(subject_dir, tmp_path, capsys):
    root = tmp_path / "kohya"
    (root / "x_name").mkdir(parents=True)
    out = tmp_path / "runs"
    assert main(["train", "tiny-lora", "--data", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "x_name" in err and "10_sks dog" in err and "Traceback" not in err
    assert not out.exists()


def test_a_validation_split_that_leaves_nothing_to_train_is_refused(subject_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", "tiny-lora", "--data", str(subject_dir), "--out", str(out),
                 "--set", "data.validation_split=0.9"]) == 2
    err = capsys.readouterr().err
    assert "data.validation_split" in err and "none to train" in err
    assert not out.exists()


def validation_curve(run) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in run.events() if e["event"] == "validation"]


def test_validation_loss_is_the_same_for_the_same_seed_and_moves_with_training(subject_dir, tmp_path):
    sets = SHORT + ["data.validation_split=0.25", "train.learning_rate=1e-2"]
    a, _, _ = train_tiny(tmp_path / "a", subject_dir, sets)
    b, _, _ = train_tiny(tmp_path / "b", subject_dir, sets)
    curve = validation_curve(a)
    assert [s for s, _ in curve] == [0, 2, 4] and curve == validation_curve(b)
    assert curve[0][1] != curve[-1][1] and all(math.isfinite(v) for _, v in curve)
    start = next(e for e in a.events() if e["event"] == "start")
    assert (start["images"], start["validation_images"]) == (3, 1)


@pytest.mark.parametrize("recipe, sets", [
    # its own class prompt: its own class-image cache, so test_dreambooth's generation counts hold in any order
    ("tiny-dreambooth", ["prior.num_class_images=3", "prior.class_prompt='a bucketed {class_word}'", "data.buckets=true",
                         "data.bucket_step=16"]),
    ("tiny-xl-lora", ["data.buckets=true", "data.bucket_step=16", "data.masked_loss=true",
                      "data.shuffle_tags=true", "data.keep_tokens=1", "train.batch_size=2"]),
], ids=["dreambooth-prior-buckets", "sdxl-buckets-masks-tags"])
def test_bucketed_runs_train_through_the_loop(recipe, sets, shapes_dir, tmp_path):
    run, _, exports = train_tiny(tmp_path, shapes_dir, SHORT + sets + ["data.min_image_size=32"], recipe=recipe)
    start = next(e for e in run.events() if e["event"] == "start")
    assert start["buckets"] == 3
    assert all(math.isfinite(e["loss"]) for e in run.events() if e["event"] == "step")
    assert exports and all(p.exists() for p in exports)


def test_tensorboard_gets_loss_lr_validation_loss_and_samples(subject_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _ = train_tiny(tmp_path, subject_dir, SHORT + ["train.log_with=['tensorboard']", "data.validation_split=0.25",
                                                           "sample.at_checkpoints=true", "train.log_every=2"])
    logs = EventAccumulator(str(next((run.path / "logs").rglob("events.out.tfevents.*")).parent),
                            size_guidance={"images": 0}).Reload()
    assert [e.step for e in logs.Scalars("loss")] == [2, 4]  # every train.log_every steps
    assert [e.step for e in logs.Scalars("validation_loss")] == [0, 2, 4]
    assert logs.Scalars("validation_loss")[-1].value == pytest.approx(validation_curve(run)[-1][1])
    assert [e.step for e in logs.Images("samples")] == [2, 4]  # at the checkpoint of step 2, and at the end
    assert "lr" in logs.Tags()["scalars"]


def test_data_settings_that_would_do_nothing_are_said(subject_dir):
    recipe = resolve_recipe("tiny-lora", ["data.keep_tokens=1", "data.bucket_step=16", "data.unmasked_weight=0.1"],
                            {"data.path": str(subject_dir)})
    notes = " ".join(recipe.notes())
    assert "data.keep_tokens = 1 does nothing without data.shuffle_tags" in notes
    assert "data.bucket_step = 16 does nothing without data.buckets = true" in notes
    assert "data.unmasked_weight" in notes
    on = resolve_recipe("tiny-lora", ["data.keep_tokens=1", "data.shuffle_tags=true"], {"data.path": str(subject_dir)})
    assert not on.notes()


def test_mask_files_are_read_by_brightness_and_the_hidden_part_weighs_unmasked_weight(shapes_dir, tmp_path):
    from dreamloom.datasets.masks import find_mask, load_mask
    from dreamloom.datasets.scan import load_items

    folder = tmp_path / "rgba"
    folder.mkdir()
    (folder / "p.png").write_bytes((shapes_dir / "p3.png").read_bytes())  # 96 x 96
    Image.open(shapes_dir / "p3.mask.png").convert("RGBA").save(folder / "p.mask.png")  # opaque RGBA, as editors save
    item = load_items(folder, trigger="sks", class_word="star", min_image_size=32, masks=True)[0]
    assert item.mask == folder / "p.mask.png" and find_mask(item, "p.png", []) == item.mask
    weights = load_mask(item.mask, (64, 64), (0, 0), False, 8, unmasked_weight=0.25)
    assert weights[0, :, 0].tolist() == [0.25] * 8 and weights[0, :, -1].tolist() == [1.0] * 8


def test_regularization_folders_are_captioned_as_class_pictures(subject_dir, tmp_path):
    recipe = resolve_recipe("tiny-lora", ["data.caption_prefix='{trigger}, '",
                                          f"data.folders=[{{path='{subject_dir}', regularization=true}}]"],
                            {"data.path": str(subject_dir), "data.class_word": "star"})
    split = recipe_data(recipe)
    assert {i.caption for i in split.train} == {"sks, a photo of sks star"}
    assert {i.caption for i in split.regularization} == {"a photo of star"}  # the trigger never reaches them


def test_a_bucket_step_larger_than_the_resolution_is_refused(subject_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", "tiny-lora", "--data", str(subject_dir), "--out", str(out), "--set", "data.buckets=true",
                 "--set", "data.bucket_step=128"]) == 2
    err = capsys.readouterr().err
    assert "data.bucket_step = 128" in err and "at most 64" in err and not out.exists()


def test_hue_jitter_recolours_the_subject_and_keeps_its_shape_and_gray_backgrounds(tmp_path):
    """data.hue_jitter's turn of the colour wheel, as the toy judge sees it: the orange heart comes out in another
    colour, still a heart, on the white and gray backgrounds it had."""
    from dreamloom.datasets import load_image
    from dreamloom.datasets.images import rotate_hue
    from dreamloom.toy.judge import judge_images
    from dreamloom.toy.world import write_subject_folder

    pixels = torch.stack([load_image(p, 64) for p in write_subject_folder(tmp_path, "heart")])
    before = judge_images(pixels)["labels"]
    assert set(before["colour"]) == {"orange"} and set(before["shape"]) == {"heart"}
    for turn in (1 / 3, -1 / 3):
        after = judge_images(torch.stack([rotate_hue(p, turn) for p in pixels]))["labels"]
        assert "orange" not in after["colour"] and after["shape"] == before["shape"]
        assert after["background"] == before["background"]


def test_hue_jitter_varies_the_instance_pictures_at_every_draw_and_not_the_class_pictures(shapes_dir, tiny):
    _, recipe = tiny_data(shapes_dir, ["data.hue_jitter=1.0"], tiny)
    items = recipe_data(recipe).train
    jittered = TrainingData(items, recipe, tiny, hue_jitter=recipe.data.hue_jitter)  # the instance pictures
    plain = TrainingData(items, recipe, tiny, seed=1)  # class pictures: the same recipe, no jitter
    assert not jittered.cached and plain.cached  # a new hue every draw: nothing to cache
    for e in range(len(items)):
        first, second = (jittered._moments(e, False, torch.Generator().manual_seed(s))[0] for s in (1, 2))
        assert not torch.allclose(first, second, atol=1e-3)
        again = jittered._moments(e, False, torch.Generator().manual_seed(1))[0]
        assert torch.equal(first, again)  # drawn from the step's generator: a resumed run sees the same hues
        assert torch.equal(plain._moments(e, False, torch.Generator().manual_seed(1))[0],
                           plain._moments(e, False, torch.Generator().manual_seed(2))[0])
