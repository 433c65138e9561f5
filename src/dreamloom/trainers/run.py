"""Starting, resuming and re-exporting runs: everything is checked before a run dir exists,
so bad input never leaves a half-made run behind."""

from __future__ import annotations

from pathlib import Path

from ..errors import DreamloomError, RecipeError
from ..jobs import RunDir
from ..models import check_base_spec, load_base
from ..recipes.schema import METHOD_FORMATS
from .checkpoint import load_trainable
from .loop import dataset_items, train
from .prior import user_class_items
from .registry import get_method


def check_run_inputs(recipe) -> list:
    """Everything that can be checked without loading the model; returns the training items."""
    if not recipe.data.path:
        raise RecipeError("no training images: pass --data FOLDER (or set data.path in the recipe).")
    get_method(recipe.method)(recipe)  # a method checks its own settings on creation
    check_base_spec(recipe.base.model)
    items = dataset_items(recipe)  # every image decoded and checked; all problems reported at once
    if recipe.prior.enabled and recipe.prior.class_data:
        user_class_items(recipe)  # the user's class images are checked just the same
    return items


def start_run(recipe, out_root: str | Path) -> tuple[RunDir, list[Path]]:
    items = check_run_inputs(recipe)
    base = load_base(recipe.base.model)
    run = RunDir.create(out_root, recipe)
    run.write_manifest(items)
    print(f"run directory: {run.path}", flush=True)
    return run, train(run, base=base, items=items)


def is_finished(run: RunDir) -> bool:
    return any(e["event"] == "end" for e in run.events())


def resume_run(path: str | Path) -> tuple[RunDir, list[Path]]:
    run = RunDir.open(path)
    if is_finished(run):
        raise DreamloomError(f"run '{run.path}' already finished; nothing to resume. "
                             f"Re-export it with `dreamloom export {run.path}`.")
    return run, train(run, resume=True)


def export_run(path: str | Path, formats: list[str] | None = None, overwrite: bool = False) -> list[Path]:
    """Export from the run's latest checkpoint (a finished run, or one still under way)."""
    run = RunDir.open(path)
    latest = run.latest_checkpoint()
    if latest is None:
        raise DreamloomError(f"run '{run.path}' has no checkpoint yet; nothing to export.")
    recipe = run.recipe()
    allowed = METHOD_FORMATS[recipe.method]
    unknown = [f for f in formats or [] if f not in allowed]
    if unknown:
        raise DreamloomError(f"{recipe.method} runs export {', '.join(allowed)}; not {', '.join(unknown)}.")
    base = load_base(recipe.base.model)
    method = get_method(recipe.method)(recipe)
    method.prepare(base)
    method.load_state_dict(base, load_trainable(latest))
    paths = method.export(base, run, formats or recipe.export.formats, overwrite=overwrite)
    run.log("export", paths=[str(p) for p in paths], checkpoint=str(latest))
    return paths
