"""The studio's plain-Python helpers for datasets and job progress, without Streamlit."""

from __future__ import annotations

import pytest

from dreamloom.errors import DatasetError
from dreamloom.rundir import RunDir
from dreamloom.recipes import resolve_recipe
from dreamloom.studio import datasets as ds
from dreamloom.studio import literal
from dreamloom.studio import train_form as form
from dreamloom.studio.progress import format_eta, log_tail, run_progress
from helpers import subject_image, write_subject_images


@pytest.fixture
def dataset(tmp_path):
    folder = ds.create_dataset(tmp_path, "My Stars!", ds.DatasetSettings("sks", "star"))
    write_subject_images(folder, count=3)
    return folder


def test_datasets_are_listed_with_their_words(tmp_path, dataset):
    assert dataset.name == "My-Stars" and ds.list_datasets(tmp_path) == ["My-Stars"]
    assert ds.read_settings(dataset) == ds.DatasetSettings("sks", "star")
    ds.write_settings(dataset, ds.DatasetSettings(" zwx ", "dog"))
    assert ds.read_settings(dataset) == ds.DatasetSettings("zwx", "dog")
    with pytest.raises(DatasetError, match="already exists"):
        ds.create_dataset(tmp_path, "My-Stars", ds.DatasetSettings())
    with pytest.raises(DatasetError, match="one word"):
        ds.write_settings(dataset, ds.DatasetSettings("two words", "dog"))
    with pytest.raises(DatasetError, match="Give the dataset a name"):
        ds.create_dataset(tmp_path, "../", ds.DatasetSettings())


def test_problems_unreadable_small_and_duplicate(dataset):
    (dataset / "copy.png").write_bytes((dataset / "subject-0.png").read_bytes())
    (dataset / "broken.jpg").write_bytes(b"not a jpeg")
    subject_image(0, size=40).save(dataset / "small.png")
    problems = {e.path.name: e.problems for e in ds.scan_images(dataset)}
    assert problems["broken.jpg"] == ("unreadable: not an image, or corrupt",)
    assert problems["small.png"] == ("too small: the shorter side must be at least 64 px",)
    assert problems["copy.png"] == () and problems["subject-1.png"] == ()  # the first of two copies is fine
    assert problems["subject-0.png"] == ("duplicate of copy.png",)
    assert ds.thumbnail(dataset / "broken.jpg") is None and ds.thumbnail(dataset / "subject-1.png")[:2] == b"\xff\xd8"


def test_captions_inline_bulk_trigger_and_find_replace(dataset):
    first, second, third = ds.image_paths(dataset)
    ds.write_caption(first, "  a star   on blue ")
    ds.write_caption(second, "sks star, red")
    assert ds.read_caption(first) == "a star on blue"
    assert ds.add_trigger(dataset, "sks") == 1  # the second has it; the third uses the template
    assert ds.read_caption(first) == "sks, a star on blue" and ds.read_caption(third) == ""
    assert ds.add_trigger(dataset, "sks") == 0
    assert ds.find_replace(dataset, "star", "starfish") == 2
    assert ds.read_caption(second) == "sks starfish, red"
    ds.write_caption(second, "")
    assert not ds.caption_path(second).exists()
    ds.remove_image(first)
    assert not first.exists() and not ds.caption_path(first).exists()


def test_demo_dataset_has_four_captioned_crescents_and_is_never_overwritten(tmp_path):
    folder = ds.add_demo_dataset(tmp_path)
    assert folder == tmp_path / "datasets" / "demo-crescent" and ds.list_datasets(tmp_path) == ["demo-crescent"]
    assert ds.read_settings(folder) == ds.DatasetSettings("sks", "shape")
    entries = ds.scan_images(folder)
    assert [e.path.name for e in entries] == [f"crescent-{i}.png" for i in range(4)]
    assert all((e.width, e.height, e.problems) == (64, 64, ()) for e in entries)
    assert [e.caption for e in entries] == ["a {trigger} {class_word} on a white background",
                                            "a {trigger} {class_word} on a gray background"] * 2
    assert ds.add_trigger(folder, "sks") == 0  # the placeholder is the trigger: training fills it in

    ds.write_caption(entries[0].path, "my own words")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(DatasetError, match="'demo-crescent' exists already"):
        ds.add_demo_dataset(tmp_path)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_default_recipe_is_on_the_toy_base_then_tiny(tmp_path):
    assert form.BUILTIN_BASES[:2] == ["toy", "tiny"] and "random:sd15" in form.BUILTIN_BASES
    choices = form.recipe_choices(tmp_path, "lora")
    assert choices[form.default_index(choices)].label == "toy-lora (built-in)"
    without_toy = [c for c in choices if not c.label.startswith("toy-")]
    assert without_toy[form.default_index(without_toy)].label == "tiny-lora (built-in)"
    assert form.default_index([c for c in choices if c.label.startswith("sd15-")]) == 0


def test_run_progress_eta_losses_and_log_tail(tmp_path):
    recipe = resolve_recipe("tiny-lora", values={"data.path": str(tmp_path)})
    run = RunDir.create(tmp_path / "runs", recipe)
    assert run_progress(run.path).total is None and run_progress(None).step == 0
    run.log("start", steps=100, resumed_from=0, loss_before=0.5)
    for step in range(1, 11):
        run.log("step", step=step, loss=1.0 / step, lr=1e-3, it_s=2.0, images_s=4.0, peak_mem_mb=10.0)
    progress = run_progress(run.path)
    assert (progress.step, progress.total, progress.fraction) == (10, 100, 0.1)
    assert progress.eta_s == pytest.approx(45.0) and progress.losses[-1] == (10, 0.1)
    run.log("error", message="RuntimeError: out of memory")
    assert run_progress(run.path).error == "RuntimeError: out of memory"
    assert [format_eta(s) for s in (None, 5, 65, 3700)] == ["estimating...", "5 s", "1 min 05 s", "1 h 01 min"]
    log = tmp_path / "job.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "bar 10%\rbar 20%\r")
    assert log_tail(log, lines=3) == "line 99\nbar 10%\nbar 20%" and log_tail(tmp_path / "none.log") == ""


def test_messages_show_file_names_literally():
    assert literal("- my_dog_1.png: costs $5, *not* <b>") == r"- my\_dog\_1.png: costs \$5, \*not\* \<b\>"
