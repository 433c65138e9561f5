"""Everything the runs in the studio's home exported: one row per file (or folder) a user can take
away, with its format, size and what it was trained for."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import DreamloomError
from ..rundir import MARKER, RunDir
from ..trainers.registry import METHODS


@dataclass(frozen=True)
class Export:
    path: Path  # the file to download (a folder is downloaded as a zip)
    run: str
    method: str
    format: str
    loads_in: str
    size_bytes: int
    base: str
    trigger: str
    class_word: str
    prompt: str  # the run's first validation prompt, filled in: a good start for the try-it panel
    steps: int  # the run's sampling settings: what its base draws well with
    guidance_scale: float
    try_it: str | None  # how the try-it panel puts it on the base (its format's attach), if it can

    @property
    def download_name(self) -> str:
        name = self.path.name
        if self.path.parent.name.startswith("step-"):  # a checkpoint's export: the step in its name
            name = f"{self.path.stem}-{self.path.parent.name}{self.path.suffix}"
        return f"{self.run.split(' ')[0]}-{name}.zip" if self.path.is_dir() else name


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def run_exports(run: RunDir, label: str | None = None) -> list[Export]:
    """The run's exports that exist, in its method's format order (the main export first), then those
    exported from its checkpoints (exports/step-N)."""
    recipe = run.recipe()
    prompt = recipe.fill(recipe.sample.prompts[0]) if recipe.sample.prompts else recipe.fill("{trigger}")
    rows = []
    for fmt in METHODS[recipe.method].formats:
        path = run.exports / fmt.path(recipe)
        found = [(path, fmt.name, fmt.loads_in, fmt.attach)]
        if fmt.companion:
            found.append((path.with_suffix(fmt.companion[0]), f"{fmt.name} config", fmt.companion[1], None))
        for entry, name, loads_in, attach in found:
            if entry.is_file() or (entry.is_dir() and any(p.is_file() for p in entry.rglob("*"))):
                rows.append(Export(entry, label or run.path.name, recipe.method, name, loads_in, _size(entry),
                                   recipe.base.model, recipe.data.trigger, recipe.data.class_word, prompt,
                                   recipe.sample.steps, recipe.sample.guidance_scale, attach))
    if label is None:
        for step in run.exported_steps():
            rows += run_exports(run.checkpoint_exports(step), f"{run.path.name} (step {step})")
    return rows


def scan_exports(home: Path) -> list[Export]:
    """Every export under `<home>/runs`, newest run first; folders that are not readable runs are skipped."""
    runs_root = Path(home) / "runs"
    runs = [p for p in runs_root.iterdir() if (p / MARKER).is_file()] if runs_root.is_dir() else []
    rows = []
    for folder in sorted(runs, key=lambda p: (p / MARKER).stat().st_mtime, reverse=True):
        try:
            rows += run_exports(RunDir.open(folder))
        except (DreamloomError, OSError):  # a recipe this version cannot read
            continue
    return rows


def download_bytes(export: Export) -> bytes:
    """The file's bytes, or a zip of the folder (stored: weights do not compress)."""
    if not export.path.is_dir():
        return export.path.read_bytes()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for file in sorted(p for p in export.path.rglob("*") if p.is_file()):
            archive.write(file, file.relative_to(export.path.parent).as_posix())
    return out.getvalue()
