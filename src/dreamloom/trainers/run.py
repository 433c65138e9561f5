"""Starting, training, resuming and re-exporting runs. Creating a run directory is separate from
training it: the CLI does both in one process (`start_run`); the job queue's worker creates the
run directory and starts the trainer on it (`python -m dreamloom.trainers RUN` -> `train_run`),
new or resumed alike. Everything that can be
checked is checked before a run directory exists, so bad input never leaves a half-made run."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from safetensors import SafetensorError

from ..datasets.sources import DataSplit
from ..errors import DreamloomError, RecipeError
from ..rundir import RunDir, main_process
from ..models import parse_base_spec, spec_arch
from ..models.base import load_recipe_base, meta_base
from ..paths import check_writable_folder
from ..recipes.schema import method_formats
from .checkpoint import load_trainable
from .compiling import check_compiler
from .loop import dataset_items, train
from .optim import check_precision
from .prior import user_class_items
from .registry import get_method
from .trackers import check_trackers

# A run needs room for its checkpoints (trained weights + optimizer state, twice while the
# newest is written) and exports; below this much free space nothing starts.
MIN_FREE_BYTES = 64 * 2**20


def preflight(recipe) -> int | None:
    """The method prepared on the base's architecture built on the meta device (no weights read):
    a setting that fits no layer is refused here, before any run exists. Returns the bytes a
    checkpoint of the trained weights takes, or None where the architecture cannot be read locally."""
    spec = parse_base_spec(recipe.base.model)
    if not spec.local:
        return None
    method = get_method(recipe.method)(recipe)
    try:
        groups = method.prepare(meta_base(spec.text))
    except DreamloomError:
        raise
    except (NotImplementedError, RuntimeError):  # a library step without meta support: checked on the real base
        return None
    trained = {id(p): p for g in groups for p in g["params"]}
    return sum(p.numel() for p in trained.values()) * 4


def check_run_inputs(recipe, out_root: str | Path | None = None) -> DataSplit:
    """Everything that can be checked without loading the model; returns the run's pictures (a DataSplit)."""
    if not recipe.data.path and not recipe.data.folders:
        raise RecipeError("no training images: pass --data FOLDER (or set data.path or [[data.folders]] in the recipe).")
    get_method(recipe.method)(recipe)  # a method checks its own settings on creation
    spec = parse_base_spec(recipe.base.model)
    arch = spec_arch(spec) if spec.local else None
    for note in recipe.notes(arch):  # settings that do nothing here, or fit the base badly: said, not ignored
        warnings.warn(note, UserWarning, stacklevel=2)
    check_precision(recipe.train)
    check_trackers(recipe.train)
    check_compiler(recipe.train)
    checkpoint_bytes = preflight(recipe)
    if out_root is not None:  # weights, optimizer state (x2 for Adam), two checkpoints at a time, exports
        need = MIN_FREE_BYTES + 8 * (checkpoint_bytes or 0)
        check_writable_folder(out_root, "--out (the folder that receives the run)", need)
    split = dataset_items(recipe)  # every image decoded and checked; all problems reported at once
    if recipe.prior.enabled and recipe.prior.class_data:
        user_class_items(recipe)  # the user's class images are checked just the same
    return split


def train_run(path: str | Path, base=None, items=None) -> tuple[RunDir, list[Path]]:
    """Train a run directory to its end: from its latest checkpoint, or from the start if it has
    none (a new run, or one whose first attempt was killed before its first checkpoint)."""
    run = RunDir.open(path)
    if run.is_finished():
        raise DreamloomError(f"run '{run.path}' already finished; nothing to resume. "
                             f"Re-export it with `dreamloom export {run.path}`.")
    if items is None:
        items = check_run_inputs(run.recipe())
        if not run.dataset_manifest() and main_process():
            run.write_manifest(items.train)
    return run, train(run, base=base, items=items)


def new_run(recipe, out_root: str | Path, items: DataSplit, log=None) -> RunDir:
    """The run directory of a checked recipe, with the manifest of its pictures."""
    run = RunDir.create(out_root, recipe)
    run.write_manifest(items.train)
    if log is not None:
        log(f"run directory: {run.path}")
    return run


def start_run(recipe, out_root: str | Path, log=None) -> tuple[RunDir, list[Path]]:
    """Check everything, load the base, then make the run directory and train it in this process.
    If training fails on a user's error before its first checkpoint, the run directory holds
    nothing of value and is removed."""
    items = check_run_inputs(recipe, out_root)
    base = load_recipe_base(recipe.base)
    run = new_run(recipe, out_root, items, log)
    try:
        return train_run(run.path, base=base, items=items)
    except (DreamloomError, KeyboardInterrupt):
        if run.latest_checkpoint() is None:
            shutil.rmtree(run.path, ignore_errors=True)
        raise


def resume_run(path: str | Path) -> tuple[RunDir, list[Path]]:
    return train_run(path)


def export_run(path: str | Path, formats: list[str] | None = None, overwrite: bool = False,
               step: int | None = None) -> list[Path]:
    """Export from one of the run's checkpoints (default: the latest, into exports/), finished or still
    under way; a checkpoint asked for by `step` exports into exports/step-N."""
    run = RunDir.open(path)
    steps = run.checkpoint_steps()
    if not steps:
        raise DreamloomError(f"run '{run.path}' has no checkpoint yet; nothing to export.")
    if step is not None and step not in steps:
        raise DreamloomError(f"run '{run.path}' has no checkpoint at step {step}; it has {', '.join(map(str, steps))}.")
    checkpoint = run.checkpoint_dir(step if step is not None else steps[-1])
    recipe = run.recipe()
    allowed = method_formats(recipe.method)
    unknown = [f for f in formats or [] if f not in allowed]
    if unknown:
        raise DreamloomError(f"{recipe.method} runs export {', '.join(allowed)}; not {', '.join(unknown)}.")
    try:
        state = load_trainable(checkpoint)
    except (SafetensorError, OSError, ValueError) as exc:
        earlier = [s for s in steps if s != int(checkpoint.name.removeprefix("step-"))]
        offer = (f" Export an earlier checkpoint with --step {earlier[-1]} (it has {', '.join(map(str, earlier))})."
                 if earlier else " The run has no other checkpoint: resume or retrain it.")
        raise DreamloomError(f"checkpoint '{checkpoint}' is damaged: its weights cannot be read "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no details'})."
                             + offer) from exc
    base = load_recipe_base(recipe.base)
    method = get_method(recipe.method)(recipe)
    method.prepare(base)
    method.load_state_dict(base, state)
    target = run.checkpoint_exports(step) if step is not None else run
    paths = method.export(base, target, formats or recipe.export.formats, overwrite=overwrite)
    # A checkpoint's own files are a separate event: what `export` events list stays the run's main exports.
    run.log("export" if step is None else "checkpoint_export", paths=[str(p) for p in paths],
            checkpoint=str(checkpoint), **({"step": step} if step is not None else {}))
    return paths
