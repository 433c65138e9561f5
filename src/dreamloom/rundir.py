"""The run directory: everything one training run writes, in a layout the CLI, the studio and
resume all read.

    <run>/run.json          marker: this folder is a dreamloom run (and of which version)
    <run>/recipe.toml       the fully resolved recipe; the run is reproducible from it
    <run>/events.jsonl      one JSON object per line: start, step, checkpoint, sample, export, end, error
    <run>/checkpoints/step-XXXXXXXX/   resumable state, written atomically
    <run>/samples/          validation grids
    <run>/exports/          the files users take away
    <run>/exports/step-N/   the same, exported from the checkpoint of step N on request
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

from . import __version__
from .atomic import atomic_write
from .errors import DreamloomError
from .recipes import Recipe, dump_recipe, recipe_from_file

MARKER = "run.json"
CHECKPOINT_PREFIX = "step-"


def main_process() -> bool:
    """False in the other processes of a run launched on several (`accelerate launch` sets RANK):
    the main one alone writes the run's record, which is the same for all of them."""
    return os.environ.get("RANK", "0") == "0"


class RunDir:
    def __init__(self, path: Path, exports: Path | None = None):
        self.path = Path(path)
        self._exports = exports

    @classmethod
    def create(cls, out_root: str | Path, recipe: Recipe) -> "RunDir":
        out_root = Path(out_root)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out_root.mkdir(parents=True, exist_ok=True)
        path, n = out_root / f"{recipe.name}-{stamp}", 1
        while True:  # never reuse (and so never overwrite) a run, also one made this instant by another worker
            try:
                path.mkdir()
                break
            except FileExistsError:
                n += 1
                path = out_root / f"{recipe.name}-{stamp}-{n}"
        run = cls(path)
        atomic_write(path / "recipe.toml", dump_recipe(recipe))
        atomic_write(path / MARKER, json.dumps({"dreamloom": __version__, "created": time.time()}))
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        path = Path(path)
        if not (path / MARKER).is_file() or not (path / "recipe.toml").is_file():
            raise DreamloomError(
                f"'{path}' is not a dreamloom run directory (no {MARKER} / recipe.toml). "
                "Pass the folder that `dreamloom train` printed, e.g. runs/tiny-lora-20260101-120000."
            )
        return cls(path)

    def write_manifest(self, items) -> None:
        """Which images and captions this run trained on (exports read it for tag counts)."""
        manifest = [{"file": str(i.path), "sha256": i.sha256, "caption": i.caption} for i in items]
        atomic_write(self.path / "dataset.json", json.dumps(manifest, indent=1))

    def dataset_manifest(self) -> list[dict]:
        path = self.path / "dataset.json"
        return json.loads(path.read_text()) if path.exists() else []

    def recipe(self) -> Recipe:
        return recipe_from_file(self.path / "recipe.toml")

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def exports(self) -> Path:
        return self._exports or self.path / "exports"

    def checkpoint_exports(self, step: int) -> "RunDir":
        """The run, with its exports going to exports/step-N: a checkpoint's files never replace the final ones."""
        return RunDir(self.path, self.path / "exports" / f"{CHECKPOINT_PREFIX}{step}")

    def exported_steps(self) -> list[int]:
        folder = self.path / "exports"
        found = [p.name.removeprefix(CHECKPOINT_PREFIX) for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()]
        return sorted(int(s) for s in found if s.isdigit())

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    def log(self, event: str, **fields) -> None:
        if not main_process():
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        with open(self.events_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def events(self) -> list[dict]:
        if not self.events_path.exists():
            return []
        out = []
        for line in self.events_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: skip it
                continue
        return out

    def is_finished(self) -> bool:
        return any(e["event"] == "end" for e in self.events())

    @property
    def stop_file(self) -> Path:
        """Written by whoever runs the trainer where no signal reaches it (a Ray cluster) to ask
        for a stop with a checkpoint; removed by them before the next start."""
        return self.path / "stop-requested"

    def stopped(self) -> bool:
        """Its trainer's last word was a stop on request (with a checkpoint)."""
        events = self.events()
        return bool(events) and events[-1]["event"] == "stopped"

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step:08d}"

    def checkpoint_steps(self) -> list[int]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(
            int(p.name.removeprefix(CHECKPOINT_PREFIX))
            for p in self.checkpoints.iterdir()
            if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
        )

    def latest_checkpoint(self) -> Path | None:
        steps = self.checkpoint_steps()
        return self.checkpoint_dir(steps[-1]) if steps else None

    def prune_checkpoints(self, keep: int) -> None:
        for step in self.checkpoint_steps()[:-keep]:
            shutil.rmtree(self.checkpoint_dir(step), ignore_errors=True)
        self.remove_partial_checkpoints()

    def remove_partial_checkpoints(self) -> None:
        """Checkpoint folders a kill or a full disk left half-written (never the latest whole one)."""
        for tmp in self.checkpoints.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)


