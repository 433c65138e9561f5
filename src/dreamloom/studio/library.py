"""Everything the runs in the studio's home exported: one row per file (or folder) a user can take
away, with its format, size and what it was trained for."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import DreamloomError
from ..jobs import RunDir
from ..jobs.rundir import MARKER

# (method, top-level export entry: its suffix, or the folder name) -> (format, where it loads)
FORMATS = {
    ("lora", ".safetensors"): ("kohya", "A1111/Forge, ComfyUI, InvokeAI, diffusers"),
    ("lora", "diffusers"): ("diffusers", "diffusers (pipe.load_lora_weights)"),
    ("dreambooth", ".safetensors"): ("single_file", "A1111/Forge, ComfyUI, InvokeAI, diffusers"),
    ("dreambooth", ".yaml"): ("single_file config", "A1111/Forge, next to the SD 2 model"),
    ("dreambooth", "diffusers"): ("diffusers", "diffusers (from_pretrained)"),
    ("hypernetwork", ".pt"): ("pt", "A1111/Forge, ComfyUI"),
    ("hypernetwork", ".safetensors"): ("safetensors", "dreamloom's sampler"),
    ("textual_inversion", ".safetensors"): ("a1111", "A1111/Forge, ComfyUI, InvokeAI"),
    ("textual_inversion", ".pt"): ("a1111_pt", "A1111/Forge, ComfyUI"),
    ("textual_inversion", "diffusers"): ("diffusers", "diffusers (load_textual_inversion)"),
}
# What the try-it panel can put on the base, by (method, format)
TRY_IT = {("lora", "kohya"): "lora", ("lora", "diffusers"): "lora",
          ("hypernetwork", "pt"): "hypernetwork", ("hypernetwork", "safetensors"): "hypernetwork",
          ("textual_inversion", "a1111"): "embedding", ("textual_inversion", "a1111_pt"): "embedding"}


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

    @property
    def try_it(self) -> str | None:
        return TRY_IT.get((self.method, self.format))

    @property
    def download_name(self) -> str:
        return f"{self.run}-{self.path.name}.zip" if self.path.is_dir() else self.path.name


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def run_exports(run: RunDir) -> list[Export]:
    recipe = run.recipe()
    rows = []
    for entry in sorted(run.exports.iterdir()) if run.exports.is_dir() else []:
        if entry.name.startswith("."):  # a temp file of an export being written
            continue
        kind = entry.name if entry.is_dir() else entry.suffix.lower()
        fmt, loads_in = FORMATS.get((recipe.method, kind), (kind.lstrip(".") or entry.name, ""))
        files = [p for p in entry.rglob("*") if p.is_file()] if entry.is_dir() else [entry]
        if not files:
            continue
        path = files[0] if len(files) == 1 else entry  # a one-file folder: offer the file itself
        prompt = recipe.fill(recipe.sample.prompts[0]) if recipe.sample.prompts else recipe.fill("{trigger}")
        rows.append(Export(path, run.path.name, recipe.method, fmt, loads_in, _size(entry), recipe.base.model,
                           recipe.data.trigger, recipe.data.class_word, prompt, recipe.sample.steps,
                           recipe.sample.guidance_scale))
    order = recipe.export.formats  # the method's main format first
    return sorted(rows, key=lambda e: order.index(e.format) if e.format in order else len(order))


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
