"""A finished run as a user samples it: its base with its exports attached (or its exported model),
and the pictures it trained on. What `dreamloom eval` (toy judge or CLIP metrics) starts from."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..errors import DreamloomError


def load_run_model(run, paths: list | None = None, strength: float = 1.0):
    """The base of the run with its exports attached at `strength`, exactly as a user would load them
    (each method says how: `Method.sampling_model`): its latest exports, or the files in `paths` (a
    checkpoint's)."""
    from ..trainers.registry import get_method

    recipe = run.recipe()
    export = [e for e in run.events() if e["event"] == "export"]
    if not export and paths is None:
        raise DreamloomError(f"run '{run.path}' has no exports yet; eval needs a finished run "
                             f"(or `dreamloom export {run.path}`).")
    method = get_method(recipe.method)
    written = {Path(p).resolve() for p in (paths if paths is not None else export[-1]["paths"])}
    files = {f.name: path for f in method.formats if (path := (run.exports / f.path(recipe)).resolve()) in written}
    return method.sampling_model(run, files, strength)


def training_images(run) -> list[Image.Image]:
    """The pictures the run trained on (what the subject is, for the metrics)."""
    paths = [Path(item["file"]) for item in run.dataset_manifest()]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise DreamloomError(f"run '{run.path}': its training pictures are needed to know the subject, but "
                             f"{', '.join(missing) or 'dataset.json lists none'} cannot be found; put them back "
                             "where the run found them.")
    return [Image.open(p).convert("RGB") for p in paths]
