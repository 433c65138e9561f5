"""The toy world, its judge and the metrics' arithmetic: fast, no model involved."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamloom.errors import DreamloomError
from dreamloom.toy.evaluate import frechet_distance, prompt_sets, Subject
from dreamloom.toy.judge import HEADS, accuracy, judge_images, load_judge
from dreamloom.toy.world import (BLOB, NAMED, SUBJECT, UNSEEN, pretraining_example, random_scene, render,
                                 subject_images, write_subject_folder)


def pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_world_is_a_function_of_its_seed():
    a = [pretraining_example(np.random.default_rng(5)) for _ in range(3)]
    b = [pretraining_example(np.random.default_rng(5)) for _ in range(3)]
    for (img_a, cap_a), (img_b, cap_b) in zip(a, b):
        assert cap_a == cap_b and np.array_equal(pixels(img_a), pixels(img_b))
    other = pretraining_example(np.random.default_rng(6))
    assert not np.array_equal(pixels(other[0]), pixels(a[0][0]))
    assert all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(subject_images("heart"), subject_images("heart")))


def test_pretraining_captions_name_only_named_shapes():
    rng = np.random.default_rng(0)
    captions = [pretraining_example(rng)[1] for _ in range(400)]
    words = {c.split()[2] for c in captions}
    assert words == set(NAMED) | {"shape"}  # subject shapes appear only as "shape"
    assert not any(s in c for c in captions for s in SUBJECT + UNSEEN)
    assert all(c.startswith("a ") and c.endswith(" background") for c in captions)


def test_judge_scores_fresh_pictures_at_least_99_percent():
    scores = accuracy(load_judge(), n=512, seed=2024)  # seeds the judge never trained on
    assert min(scores.values()) >= 0.99, scores


def test_judge_tells_a_blob_from_every_subject():
    rng = np.random.default_rng(77)
    shapes = [BLOB] * 32 + list(SUBJECT + UNSEEN) * 16
    labels = judge_images([render(random_scene(rng, shape=s)) for s in shapes])["labels"]["shape"]
    assert sum(label == s for label, s in zip(labels, shapes)) / len(shapes) >= 0.97


def test_subject_is_read_from_its_pictures_and_prompt_sets_ask_for_it():
    subject = Subject.from_images(subject_images("crescent", colour="green"), "sks shape")
    assert (subject.shape, subject.colour, subject.backgrounds) == ("crescent", "green", ("gray", "white"))
    sets = prompt_sets(subject, 64)
    assert all(len(s.prompts) == 64 for s in sets.values())
    assert sets["subject"].prompts[0] == "a sks shape on a white background"
    assert all(a["colour"] != "green" for a in sets["recolour"].asked)  # recolouring asks for new colours
    assert {a["background"] for a in sets["subject"].asked} == set(HEADS["background"])


def test_frechet_distance_is_zero_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    same, shifted = frechet_distance(a, b), frechet_distance(a, b + 1.0)
    assert same < 0.5 and shifted == pytest.approx(8.0 + same, abs=0.6)


def test_subject_folder_writes_captions_and_never_overwrites(tmp_path):
    paths = write_subject_folder(tmp_path, "heart")
    assert len(paths) == 4
    assert paths[0].with_suffix(".txt").read_text() == "a {trigger} {class_word} on a white background"
    paths[0].write_bytes(b"mine")
    write_subject_folder(tmp_path, "heart")
    assert paths[0].read_bytes() == b"mine"
    with pytest.raises(DreamloomError, match="unknown shape 'moon'"):
        write_subject_folder(tmp_path / "x", "moon")
