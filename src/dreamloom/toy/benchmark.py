"""`dreamloom eval --methods ...`: every method, from its built-in toy recipe, on the same subjects;
the table goes to QUALITY.md. A subject shape the base can draw but has no word for (heart) is
what textual inversion can bind; a never-seen shape (crescent) needs new content (LoRA, DreamBooth)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import DreamloomError
from .evaluate import Settings, Subject, evaluate_pipeline, evaluate_run, subject_word, table
from .world import SUBJECT, UNSEEN, subject_images, write_subject_folder

def parse_methods(text: str) -> list[str]:
    """Names of eval entries: every method's toy recipe, and the variants methods declare (dora, ...)."""
    from ..trainers.registry import eval_entries

    entries = eval_entries()
    names = list(entries) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in entries]
    if unknown:
        raise DreamloomError(f"unknown method(s) {unknown} for --methods; choose from all, {', '.join(entries)}.")
    return names


def parse_subjects(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SUBJECT + UNSEEN]
    if bad:
        raise DreamloomError(f"subject shape(s) {bad}: choose from {', '.join(SUBJECT + UNSEEN)} (named shapes "
                             "already have a word, so there is nothing to learn).")
    return names


def variant_name(method: str, sets: list[str], colour_captions: bool = False) -> str:
    """A method's column under recipe overrides: 'lora', or 'lora [lora.rank=2]'; a long list reads
    'prior.class_prompts=[24 items]'."""
    def short(setting: str) -> str:
        key, _, value = setting.partition("=")
        return f"{key}=[{value.count(',') + 1} items]" if value.startswith("[") and len(value) > 40 else setting
    sets = [*map(short, sets), *["colour captioned"] * colour_captions]
    return f"{method} [{', '.join(sets)}]" if sets else method


def run_folder(column: str, sets: list[str]) -> str:
    """The folder of a column's runs: its name, and a digest of the overrides (two lists of one length differ)."""
    digest = hashlib.sha1("\n".join(sets).encode()).hexdigest()[:8] if sets else ""
    return "".join(c if c.isalnum() or c in "._-=" else "_" for c in column)[:80] + (f"-{digest}" if digest else "")


def run_benchmark(methods: list[str], subjects: list[str], out: Path, settings: Settings | None = None,
                  log=print, sets: list[str] | None = None, colour_captions: bool = False) -> Path:
    """Train each method on each subject (its toy recipe with the overrides `sets`: a variant to compare), evaluate
    all of them against the untouched base; write out/QUALITY.md (and out/quality.json). Runs already finished in
    `out` are evaluated, not retrained."""
    from ..rundir import RunDir
    from ..models import load_base
    from ..recipes import resolve_recipe
    from ..trainers.registry import eval_entries
    from ..trainers.run import start_run

    settings = settings or Settings()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for shape in subjects:
        data = out / "subjects" / (f"{shape}-colour-captioned" if colour_captions else shape)
        write_subject_folder(data, shape, name_colour=colour_captions)
        columns = {}
        for method in methods:
            column = variant_name(method, sets or [], colour_captions)
            runs = out / "runs" / shape / run_folder(column, sets or [])
            done = [p for p in sorted(runs.glob("*")) if RunDir.open(p).is_finished()] if runs.is_dir() else []
            if done:
                run_path = done[-1]
            else:
                name, overrides = eval_entries()[method]
                recipe = resolve_recipe(name, [*overrides, *(sets or [])], {"data.path": str(data)})
                log(f"== {shape}: training {column} ({recipe.name})")
                run_path = start_run(recipe, runs)[0].path
            if "untouched base" not in columns:  # the same prompts, for the base as it shipped
                recipe = RunDir.open(run_path).recipe()
                subject = Subject.from_images(subject_images(shape), subject_word(recipe))
                columns["untouched base"] = evaluate_pipeline(load_base(recipe.base.model).pipeline(),
                                                              subject, settings)[0]
            log(f"== {shape}: evaluating {column}")
            report = evaluate_run(run_path, settings, base_metrics=columns["untouched base"])
            columns[column] = report["metrics"]
        results[shape] = columns
    (out / "quality.json").write_text(json.dumps(results, indent=2))
    path = out / "QUALITY.md"
    path.write_text(render_report(results, methods, subjects, settings, [*(sets or [])], colour_captions))
    return path


def render_report(results: dict, methods: list[str], subjects: list[str], settings: Settings, sets=(),
                  colour_captions: bool = False) -> str:
    command = (f"dreamloom eval --methods {','.join(methods)} --subjects {','.join(subjects)} --samples {settings.samples}"
               + "".join(f" --set {s}" for s in sets) + " --colour-captions" * colour_captions)
    parts = ["# Personalization quality on the toy base", "",
             f"Made by `{command}` (every number a share of {settings.samples} generated pictures per "
             f"metric, ± one standard error, DDIM {settings.steps} steps, guidance {settings.guidance}, fixed seeds; the judge "
             "is dreamloom.toy.judge). Each method trained from its built-in toy recipe on 4 pictures "
             "of the subject (one colour, white and gray backgrounds).", ""]
    for shape in subjects:
        kind = "seen in pretraining only as 'a shape'" if shape in SUBJECT else "never seen in pretraining"
        parts += [f"## Subject: {shape} ({kind})", "", table(results[shape]), ""]
    return "\n".join(parts)
