"""Every studio page through Streamlit's AppTest, in the states a user meets: an empty home, one with
data, a running job, a failed job and its error; plus bad input through the UI, and the Library's
helpers and try-it panel on a really trained run."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

import dreamloom.studio
from dreamloom.rundir import RunDir
from dreamloom.jobs.queue import JobQueue
from dreamloom.jobs.worker import job_log, run_worker
from dreamloom.models import load_base
from dreamloom.recipes import resolve_recipe
from dreamloom.studio import datasets as ds
from dreamloom.studio.library import download_bytes, scan_exports
from dreamloom.trainers.registry import METHODS
from dreamloom.trainers.run import start_run
from helpers import compare, subject_image, train_tiny, write_subject_images

APP = Path(dreamloom.studio.__file__).parent / "app.py"
TIMEOUT = 120  # the first run of a page imports torch and diffusers; the machine may be busy
QUICK = ["sample.steps=2", "sample.images_per_prompt=1"]
FAILURE = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One really trained tiny LoRA run (with its exports and final samples), copied into each home."""
    root = tmp_path_factory.mktemp("trained")
    subject = root / "subject"
    write_subject_images(subject)
    run, _, _ = train_tiny(root / "runs", subject, sets=QUICK + ["train.steps=8"])
    return run


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A few steps of toy-lora on the demo crescents, on the pretrained toy base."""
    root = tmp_path_factory.mktemp("toy")
    recipe = resolve_recipe("toy-lora", QUICK + ["train.steps=4", "prior.enabled=false"],
                            {"data.path": str(ds.add_demo_dataset(root))})
    run, _ = start_run(recipe, root / "runs")
    return run


def png(index: int = 0, size: int = 96) -> bytes:
    out = io.BytesIO()
    subject_image(index, size).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMLOOM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def stars(home):
    folder = ds.create_dataset(home, "stars", ds.DatasetSettings("sks", "star"))
    write_subject_images(folder)
    return folder


@pytest.fixture
def jobs(home, stars, trained):
    """A finished job (a real run), a failed one with its error, a running one a few steps in."""
    queue = JobQueue(home)
    recipe = trained.recipe().model_copy(update={"data": trained.recipe().data.model_copy(
        update={"path": str(stars)})})
    finished_run = Path(shutil.copytree(trained.path, home / "runs" / trained.path.name))
    ids = {}
    for state in ("finished", "failed", "running"):
        ids[state] = queue.submit(recipe, home / "runs")
        queue.claim(os.getpid())
    queue.update(ids["finished"], run_dir=str(finished_run))
    queue.finish(ids["finished"], "finished")

    failed_run = RunDir.create(home / "runs", recipe.model_copy(update={"name": "failing"}))
    failed_run.log("start", steps=100, resumed_from=0, loss_before=0.4)
    failed_run.log("error", message=FAILURE)
    queue.update(ids["failed"], run_dir=str(failed_run.path))
    queue.finish(ids["failed"], "failed", error=FAILURE)
    job_log(queue, ids["failed"]).parent.mkdir(parents=True, exist_ok=True)
    job_log(queue, ids["failed"]).write_text(f"run directory: {failed_run.path}\nTraceback...\n{FAILURE}\n")

    running_run = RunDir.create(home / "runs", recipe.model_copy(update={"name": "running"}))
    running_run.log("start", steps=100, resumed_from=0, loss_before=0.4)
    for step in (1, 2, 3):
        running_run.log("step", step=step, loss=0.3 / step, lr=3e-3, it_s=1.5, images_s=3.0, peak_mem_mb=0.0)
    queue.update(ids["running"], run_dir=str(running_run.path))
    return ids


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    if page != "datasets":
        at.switch_page(f"screens/{page}.py").run()
    assert not at.exception, at.exception
    return at


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def labelled(widgets, label: str):
    return next(w for w in widgets if w.label == label)


def click(at: AppTest, label: str) -> AppTest:
    next(b for b in at.button if b.label == label).click().run()
    assert not at.exception, at.exception
    return at


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# --- Datasets ---------------------------------------------------------------------------------------

def test_datasets_empty_then_create_one(home):
    at = open_page("datasets")
    assert "No datasets yet" in texts(at.info)
    labelled(at.text_input, "Name").input("My Dog")
    labelled(at.text_input, "Class word").input("dog")
    click(at, "Create dataset")
    assert "Dataset 'My-Dog' created" in texts(at.success) and "No pictures in this dataset yet" in texts(at.info)
    assert ds.read_settings(home / "datasets" / "My-Dog") == ds.DatasetSettings("sks", "dog")


def test_datasets_upload_grid_problems_and_captions(home, stars):
    for image in ds.image_paths(stars):
        ds.remove_image(image)
    at = open_page("datasets")
    at.file_uploader[0].set_value([(f"photo {i}.png", png(i), "image/png") for i in range(4)]
                                  + [("again.png", png(0), "image/png"), ("tiny.png", png(1, 40), "image/png")]).run()
    click(at, "Add to dataset")
    assert "Added 6 picture(s)" in texts(at.success)
    assert len(at.image) == 6 and "6 picture(s)" in texts(at.subheader)
    assert "2 picture(s) have a problem" in texts(at.warning)
    errors = texts(at.error)
    assert "duplicate of again.png" in errors and "too small: the shorter side must be at least 64 px" in errors

    at.text_input(key="caption-photo-1.png-0").input("a star on a green field").run()
    assert ds.read_caption(stars / "photo-1.png") == "a star on a green field"
    click(at, "Add the trigger word")
    assert "Trigger added to 1 caption(s)" in texts(at.success)
    assert at.text_input(key="caption-photo-1.png-1").value == "sks, a star on a green field"
    at.text_input(key="find").input("green")
    at.text_input(key="replace").input("blue")
    click(at, "Replace in all captions")
    assert ds.read_caption(stars / "photo-1.png") == "sks, a star on a blue field"
    at.text_input(key="trigger-stars").input("zwx")
    click(at, "Save words")
    assert ds.read_settings(stars).trigger == "zwx"


def test_datasets_demo_button_adds_the_crescents_once_and_they_train_with_one_click(home):
    at = open_page("datasets")
    click(at, "Add the demo dataset (4 crescents)")
    folder = home / "datasets" / "demo-crescent"
    assert "Dataset 'demo-crescent' added: 4 pictures, trigger sks, class word shape" in texts(at.success)
    assert labelled(at.selectbox, "Dataset").value == "demo-crescent" and len(at.image) == 4
    assert not at.warning and not at.error  # no picture has a problem
    assert at.text_input(key="caption-crescent-0.png-0").value == "a {trigger} {class_word} on a white background"
    before = snapshot(folder)
    click(at, "Add the demo dataset (4 crescents)")
    assert "A dataset named 'demo-crescent' exists already; it was left as it is." in texts(at.error)
    assert snapshot(folder) == before and ds.list_datasets(home) == ["demo-crescent"]

    at.switch_page("screens/train.py").run()
    assert labelled(at.selectbox, "Recipe").value == "toy-lora (built-in)"
    assert labelled(at.selectbox, "Dataset").value == "demo-crescent"
    click(at, "Train")
    assert "Job 1 is queued" in texts(at.success), texts(at.error)
    recipe = JobQueue(home).get(1).recipe
    assert 'model = "toy"' in recipe and 'class_word = "shape"' in recipe and str(folder) in recipe


def zip_of(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


@pytest.mark.parametrize("upload, message", [
    (("escape.zip", zip_of({"ok.png": png(), "../../escape.png": png()}), "application/zip"),
     "'../../escape.png' points outside the dataset"),
    (("fake.png", b"this is not a picture", "image/png"), "fake.png: not a readable image"),
    (("huge.png", png() + bytes(26 * 1024 * 1024), "image/png"), "huge.png: 26.0 MB; an image may be at most 25 MB"),
])
def test_datasets_bad_uploads_show_a_message_and_change_nothing(home, stars, upload, message):
    before = snapshot(stars)
    at = open_page("datasets")
    at.file_uploader[0].set_value([upload]).run()
    click(at, "Add to dataset")
    assert "Nothing was added" in texts(at.error) and message in texts(at.error)
    assert snapshot(stars) == before


# --- Train ------------------------------------------------------------------------------------------

def test_train_empty_points_to_datasets(home):
    at = open_page("train")
    assert "First make a dataset" in texts(at.info)


def test_train_defaults_work_out_of_the_box_and_submit_to_the_queue(home, stars):
    at = open_page("train")
    assert labelled(at.selectbox, "Method").options == [m.replace("_", " ") for m in METHODS]
    assert labelled(at.selectbox, "Method").value == "lora"
    assert labelled(at.selectbox, "Recipe").value == "toy-lora (built-in)"
    assert labelled(at.radio, "Base model").value == "Built-in"
    assert labelled(at.selectbox, "Built-in base").value == "toy"
    assert labelled(at.selectbox, "Dataset").value == "stars"
    assert all(n.help for n in at.number_input)  # every setting says what it does
    assert at.metric[0].label == "Predicted GPU memory" and at.metric[0].value.endswith(" GiB")
    labelled(at.number_input, "Training steps").set_value(7)
    click(at, "Train")
    assert "Job 1 is queued" in texts(at.success)
    recipe = JobQueue(home).get(1)
    assert 'model = "toy"' in recipe.recipe and "steps = 7" in recipe.recipe and str(stars) in recipe.recipe
    assert 'trigger = "sks"' in recipe.recipe and 'class_word = "star"' in recipe.recipe


def test_train_offers_every_method_with_a_recipe_and_its_settings(home, stars):
    at = open_page("train")
    for method in METHODS:
        labelled(at.selectbox, "Method").set_value(method).run()
        assert not at.exception and not at.error, (method, texts(at.error))
        recipe = labelled(at.selectbox, "Recipe").value
        assert recipe.startswith("toy-") or recipe == f"{method} defaults", (method, recipe)
        assert labelled(at.number_input, "Training steps").value > 0


def test_train_with_a_hub_base_has_no_memory_estimate(home, stars):
    at = open_page("train")
    labelled(at.radio, "Base model").set_value("Hugging Face hub id").run()
    labelled(at.text_input, "Hub id").input("someone/some-model").run()
    assert not at.metric and "No GPU memory estimate for this base" in texts(at.caption)


def test_train_offers_the_sdxl_recipes_and_bases_with_their_estimate(home, stars):
    at = open_page("train")
    assert {"tiny-xl", "random:sdxl"} <= set(labelled(at.selectbox, "Built-in base").options)
    labelled(at.selectbox, "Recipe").set_value("sdxl-lora-12gb (built-in)").run()
    assert not at.exception and not at.error, texts(at.error)
    assert labelled(at.text_input, "Hub id").value == "stabilityai/stable-diffusion-xl-base-1.0"
    assert labelled(at.number_input, "Resolution (px)").value == 1024
    gib = float(at.metric[0].value.removesuffix(" GiB"))  # a published base: estimated without a download
    assert 4 < gib < 10


def test_train_refuses_a_dataset_with_problems_and_queues_nothing(home, stars):
    (stars / "broken.png").write_bytes(b"not an image")
    at = open_page("train")
    click(at, "Train")
    assert "broken.png" in texts(at.error) and not JobQueue(home).jobs()


def test_train_recipe_files_save_download_upload(home, stars):
    at = open_page("train")
    assert at.download_button[0].label == "Download this recipe (TOML)"
    labelled(at.text_input, "Save as").input("my recipe")
    click(at, "Save recipe")
    assert "Saved: 'my-recipe'" in texts(at.success)
    assert "my-recipe (saved)" in labelled(at.selectbox, "Recipe").options

    saved = home / "saved-recipes"
    before = snapshot(saved)
    bad = b'name = "typo"\nmethod = "lora"\n[train]\nstepz = 10\n'
    at.file_uploader(key="recipe-upload").set_value(("typo.toml", bad, "application/toml")).run()
    click(at, "Add recipe")
    assert "unknown key 'train.stepz'" in texts(at.error) and snapshot(saved) == before
    good = b'name = "shared"\nmethod = "lora"\n[train]\nsteps = 10\n'
    at.file_uploader(key="recipe-upload").set_value(("shared.toml", good, "application/toml")).run()
    click(at, "Add recipe")
    assert "Added: 'shared'" in texts(at.success) and (saved / "shared.toml").is_file()


# --- Jobs -------------------------------------------------------------------------------------------

def pick_job(at: AppTest, job_id: int) -> AppTest:
    at.selectbox(key="job-picker").set_value(job_id).run()
    assert not at.exception, at.exception
    return at


def test_jobs_empty(home):
    at = open_page("jobs")
    assert "No jobs yet" in texts(at.info)


def test_jobs_running_job_shows_progress_eta_and_cancels(home, jobs):
    at = open_page("jobs")
    assert at.selectbox(key="job-picker").value == jobs["running"]  # the running job is shown first
    table = at.dataframe[0].value
    assert sorted(table["state"]) == ["failed", "finished", "running"]
    assert at.progress[0].value == 3 and "step 3 of 100 · ETA 1 min 05 s" in at.progress[0].proto.text
    assert at.get("vega_lite_chart")  # the loss curve
    click(at, "Cancel")
    assert JobQueue(home).get(jobs["running"]).cancel_requested == 1


def test_jobs_finished_job_shows_curve_samples_exports(home, jobs):
    at = pick_job(open_page("jobs"), jobs["finished"])
    assert at.progress[0].value == 100 and "finished: 8 steps" in at.progress[0].proto.text
    assert at.get("vega_lite_chart") and at.image  # the loss curve and the final validation samples
    assert "sks-lora.safetensors" in texts(at.caption)
    assert not [b for b in at.button if b.label in ("Cancel", "Resume")]


def test_jobs_failed_job_shows_its_error_and_resumes(home, jobs):
    at = pick_job(open_page("jobs"), jobs["failed"])
    assert f"Training failed: {FAILURE}" in texts(at.error)
    assert FAILURE in texts(at.code)  # the log tail
    click(at, "Resume")
    assert JobQueue(home).get(jobs["failed"]).state == "queued"


def test_jobs_rerun_with_edits_opens_train_with_the_jobs_recipe(home, jobs):
    at = pick_job(open_page("jobs"), jobs["failed"])
    click(at, "Re-run with edits")
    assert texts(at.title) == "Train"
    assert labelled(at.selectbox, "Recipe").value == f"job {jobs['failed']}'s recipe (re-run with edits)"
    at.switch_page("screens/train.py")  # AppTest stays on the page it last switched to; a browser follows the URL
    labelled(at.number_input, "Training steps").set_value(5)
    click(at, "Train")
    assert "Job 4 is queued" in texts(at.success), texts(at.error)
    assert "steps = 5" in JobQueue(home).get(4).recipe


# --- Library ----------------------------------------------------------------------------------------

def test_library_empty(home):
    at = open_page("library")
    assert "Nothing exported yet" in texts(at.info)


def test_library_lists_exports_downloads_and_tries_them(home, jobs):
    at = open_page("library")
    table = at.dataframe[0].value
    assert sorted(table["format"]) == ["diffusers", "kohya"]  # the running and failed jobs exported nothing
    assert set(table["base"]) == {"tiny"} and set(table["trigger"]) == {"sks"}
    assert [b.label.split(" · ")[1] for b in at.download_button] == ["kohya", "diffusers"]
    click(at, "Generate")
    assert "Queued" in texts(at.info)  # drawing is a queued job, never the web process's work
    job = JobQueue(home).jobs()[0]
    assert job.name == "try sks-lora.safetensors" and "--x" in job.arguments and "strength=0,1" in job.arguments


def test_library_rows_and_try_it_on_a_trained_run(home, jobs, trained):
    exports = {e.format: e for e in scan_exports(home)}
    kohya, diffusers = exports["kohya"], exports["diffusers"]
    assert kohya.path.name == "sks-lora.safetensors" and kohya.size_bytes == kohya.path.stat().st_size
    assert diffusers.path.name == "pytorch_lora_weights.safetensors" and diffusers.try_it == "lora"
    assert download_bytes(kohya) == kohya.path.read_bytes()
    assert kohya.prompt == "a photo of sks star" and kohya.loads_in.startswith("A1111")

    base = load_base("tiny")
    alone, with_lora = compare(base, kohya.path, "lora", 1.0, kohya.prompt, seed=1, steps=4)
    again, _ = compare(base, kohya.path, "lora", 0.0, kohya.prompt, seed=1, steps=4)
    assert alone.tobytes() == again.tobytes()  # the LoRA came off again: the shared base is untouched
    assert alone.tobytes() != with_lora.tobytes()


def test_library_tries_a_toy_lora_on_the_toy_base_with_its_runs_settings(home, toy_run):
    shutil.copytree(toy_run.path, home / "runs" / toy_run.path.name)
    kohya = next(e for e in scan_exports(home) if e.format == "kohya")
    assert (kohya.base, kohya.prompt, kohya.guidance_scale) == ("toy", "a sks shape on a pink background", 3.0)
    at = open_page("library")
    assert labelled(at.text_input, "Prompt").value == kohya.prompt
    assert labelled(at.slider, "Guidance").value == 3.0 and labelled(at.slider, "Sampling steps").value == 5
    labelled(at.text_input, "Y axis (rows)").set_value("seed=1,2")
    click(at, "Generate")
    run_worker(home, once=True)  # what the studio's worker does: `dreamloom sample ...` in its own process
    at.run()
    assert not at.exception and not at.error, texts(at.error)
    assert [i.proto.imgs[0].caption for i in at.image] == ["sks-lora.safetensors at strength 1"]
    (picture,) = (home / "tryit").glob("*.png")
    cells = json.loads(Image.open(picture).text["dreamloom"])["cells"]
    assert [c["axes"] for c in cells] == [{"strength": s, "seed": seed} for seed in (1, 2) for s in (0.0, 1.0)]
    assert [c["fields"]["Lora 0"] for c in cells] == ['"sks-lora: 0"', '"sks-lora: 1"'] * 2

    alone, with_lora = compare(load_base("toy"), kohya.path, "lora", 1.0, kohya.prompt, seed=1, steps=4,
                               guidance_scale=3.0)
    assert alone.size == with_lora.size == (64, 64) and alone.tobytes() != with_lora.tobytes()


def test_library_and_try_it_for_a_hypernetwork(tmp_path, subject_dir):
    run, _, _ = train_tiny(tmp_path / "runs", subject_dir, sets=QUICK + ["train.steps=4"], recipe="tiny-hypernetwork")
    exports = scan_exports(tmp_path)
    assert [(e.format, e.try_it) for e in exports] == [("pt", "hypernetwork"), ("safetensors", "hypernetwork")]
    base = load_base("tiny")
    processors = base.unet.attn_processors
    alone, _ = compare(base, exports[0].path, "hypernetwork", 1.0, exports[0].prompt, seed=1, steps=4)
    assert base.unet.attn_processors == processors  # taken off again
    again, _ = compare(base, exports[0].path, "hypernetwork", 0.0, exports[0].prompt, seed=1, steps=4)
    assert alone.tobytes() == again.tobytes()


def test_try_it_for_an_embedding(tmp_path, subject_dir):
    train_tiny(tmp_path / "runs", subject_dir, sets=QUICK + ["train.steps=4"], recipe="tiny-ti")
    exports = {e.format: e for e in scan_exports(tmp_path)}
    assert exports["a1111"].try_it == exports["a1111_pt"].try_it == "embedding"
    base = load_base("tiny")
    words, rows = len(base.tokenizer), base.text_encoder.get_input_embeddings().weight.shape[0]
    alone, with_word = compare(base, exports["a1111"].path, "embedding", 1.0, exports["a1111"].prompt, seed=1, steps=4)
    assert len(base.tokenizer) == words  # the word came off again: the shared base is untouched
    assert base.text_encoder.get_input_embeddings().weight.shape[0] == rows
    again, _ = compare(base, exports["a1111_pt"].path, "embedding", 0.0, exports["a1111"].prompt, seed=1, steps=4)
    assert alone.tobytes() == again.tobytes() and alone.tobytes() != with_word.tobytes()


# --- About ------------------------------------------------------------------------------------------

def test_about_shows_the_doctor_report(home):
    at = open_page("about")
    assert "No known problems" in texts(at.success)
    table = at.dataframe[0].value
    assert {"transformers", "bitsandbytes backend", "free disk: studio home"} <= set(table["what"])
    assert any("(locked)" in value for value in table["value"])


def test_jobs_page_says_when_the_queue_was_repaired(home):
    JobQueue(home)
    (home / "jobs.db").write_bytes(b"")  # emptied
    at = open_page("jobs")
    assert "was damaged" in texts(at.warning) and "jobs.db.damaged-" in texts(at.warning)
