"""Every method, from its built-in toy recipe, learns its subject on the shipped toy base: judged
by the toy judge against the untouched base, through the real entry points (start_run -> exports
-> loaded as a user loads them -> generated -> judged)."""

from __future__ import annotations

import json

import pytest
import torch

from dreamloom.cli import main
from dreamloom.errors import DreamloomError
from dreamloom.rundir import RunDir
from dreamloom.models import load_base
from dreamloom.recipes import resolve_recipe
from dreamloom.toy.evaluate import BAR, Settings, Subject, base_bar, evaluate_pipeline, evaluate_run
from dreamloom.toy.world import subject_images, write_subject_folder
from dreamloom.trainers.run import start_run

SETTINGS = Settings(samples=64, steps=20)
SETS = ("subject", "class")  # the prompt sets these tests judge (`dreamloom eval` draws all four)
# heart: the base draws it only as "a shape" (a word can be bound to it); crescent: never seen at all
CASES = [("toy-lora", "crescent", []), ("toy-dreambooth", "crescent", []), ("toy-ti", "heart", []),
         ("toy-hypernetwork", "heart", []), ("toy-pivotal", "heart", [])]


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    root = tmp_path_factory.mktemp("subjects")
    return {shape: write_subject_folder(root / shape, shape)[0].parent for shape in ("heart", "crescent")}


@pytest.fixture(scope="module")
def base_metrics():
    cache = {}

    def get(shape):
        if shape not in cache:
            subject = Subject.from_images(subject_images(shape), "sks shape")
            cache[shape] = evaluate_pipeline(load_base("toy").pipeline(), subject, SETTINGS, SETS)[0]
        return cache[shape]
    return get


@pytest.fixture(scope="module")
def trained(tmp_path_factory, subjects):
    runs = {}

    def get(recipe, shape, sets=()):
        key = (recipe, shape, tuple(sets))
        if key not in runs:
            r = resolve_recipe(recipe, list(sets), {"data.path": str(subjects[shape])})
            runs[key] = start_run(r, tmp_path_factory.mktemp(recipe))[0]
        return runs[key]
    return get


def test_shipped_base_draws_what_it_is_told():
    # The issue's bar, at `dreamloom toy check`'s own settings (128 captions, DDIM 25, guidance 3):
    # measured shape 96.9, colour 100, background 100; at 64 captions shape has one picture to spare.
    scores = base_bar(load_base("toy"))
    assert all(scores[k] >= bar for k, bar in BAR.items()), scores


@pytest.mark.parametrize("recipe,shape,sets", CASES, ids=[c[0] for c in CASES])
def test_method_learns_its_subject(recipe, shape, sets, trained, base_metrics):
    run = trained(recipe, shape, sets)
    report = evaluate_run(run.path, SETTINGS, base_metrics=base_metrics(shape), only=SETS)
    after, before = report["metrics"], report["base_metrics"]
    assert report["subject"]["shape"] == shape
    # 64 pictures each: +-6 points of noise; 20 points is far outside it
    assert after["subject_fidelity"] >= before["subject_fidelity"] + 20.0, after
    saved = json.loads((run.path / "eval" / "metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(after) and (run.path / "eval" / "samples.png").is_file()


def test_prior_preservation_keeps_the_class_from_drifting(trained, base_metrics):
    with_prior = evaluate_run(trained("toy-dreambooth", "crescent").path, SETTINGS,
                              base_metrics=base_metrics("crescent"), only=SETS)["metrics"]
    without = evaluate_run(trained("toy-dreambooth", "crescent", ["prior.enabled=false"]).path, SETTINGS,
                           base_metrics=base_metrics("crescent"), only=SETS)["metrics"]
    # Without the class pictures, "a shape" turns into the subject; with them it stays a shape (measured 0% vs 80%
    # with the recipe's varied class prompts; 42% with its earlier single "a shape", QUALITY.md "Editability").
    assert with_prior["class_as_subject"] + 15.0 <= without["class_as_subject"], (with_prior, without)


def test_lora_leaves_what_is_not_the_subject_alone(trained, base_metrics):
    # QUALITY.md, "Editability": with its varied class prompts toy-lora draws ordinary prompts right 70% of the time
    # and class prompts in their colour and background 97% on the crescent (its one-prompt prior: 23% and 34%)
    report = evaluate_run(trained("toy-lora", "crescent").path, SETTINGS, base_metrics=base_metrics("crescent"),
                          only=("ordinary", "class"))
    metrics = report["metrics"]
    assert metrics["ordinary_accuracy"] >= 50.0 and metrics["class_accuracy"] >= 80.0, metrics
    assert metrics["class_as_subject"] <= report["base_metrics"]["class_as_subject"] + 10.0, metrics


def test_eval_command_prints_the_table(trained, capsys):
    run = trained("toy-lora", "crescent")
    assert main(["eval", str(run.path), "--samples", "8", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "subject fidelity" in out and "untouched base" in out and (run.path / "eval" / "quality.md").is_file()


def test_eval_scores_every_checkpoint_each_from_its_own_export(trained, capsys):
    run = trained("toy-lora", "crescent")
    assert main(["eval", str(run.path), "--all-checkpoints", "--samples", "8", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "| metric | untouched base | step 300 | step 400 |" in out
    report = json.loads((run.path / "eval" / "checkpoints.json").read_text())
    assert list(report["checkpoints"]) == ["300", "400"]
    from safetensors.torch import load_file

    final, at = load_file(run.path / "exports" / "sks-lora.safetensors"), {
        s: load_file(run.path / "exports" / f"step-{s}" / "sks-lora.safetensors") for s in (300, 400)}
    assert all(torch.equal(final[k], at[400][k]) for k in final)  # the last checkpoint is the final export
    assert not all(torch.equal(final[k], at[300][k]) for k in final)
    capsys.readouterr()
    assert main(["eval", str(run.path), "--samples", "8", "--steps", "10"]) == 0  # still the run's own exports


def test_eval_refuses_a_run_on_another_base_before_loading_it(subjects, tmp_path):
    # No exports either: the base is checked first, from the recipe alone, so nothing loads.
    run = RunDir.create(tmp_path, resolve_recipe("toy-lora", [], {"data.path": str(subjects["crescent"]),
                                                                   "base.model": "random:sd15"}))
    with pytest.raises(DreamloomError, match="only scores runs on the toy base.*--clip"):
        evaluate_run(run.path, SETTINGS)


def test_eval_trains_a_variant_with_its_overrides_and_reports_it_under_its_name(tmp_path, capsys):
    """`dreamloom eval --methods ... --set KEY=VALUE`: how every variant of QUALITY.md's editability table was made."""
    out = tmp_path / "q"
    assert main(["eval", "--methods", "lora", "--subjects", "crescent", "--out", str(out), "--set", "train.steps=20",
                 "--set", "prior.enabled=false", "--samples", "4", "--steps", "4"]) == 0
    assert "lora [train.steps=20, prior.enabled=false]" in (out / "QUALITY.md").read_text()
    (run,) = [RunDir.open(p) for p in (out / "runs" / "crescent").glob("*/*")]
    recipe = run.recipe()
    assert run.is_finished() and recipe.train.steps == 20 and not recipe.prior.enabled
    assert main(["eval", "--methods", "lora", "--subjects", "crescent", "--out", str(out), "--set", "train.steps=20",
                 "--set", "prior.enabled=false", "--samples", "4", "--steps", "4"]) == 0
    assert len(list((out / "runs" / "crescent").glob("*/*"))) == 1  # a finished variant is evaluated, not retrained
