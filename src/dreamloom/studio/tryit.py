"""The Library's try-it panel: an exported file sampled on its base through the job queue, as a
`dreamloom sample` command job, so that a large base never loads into the Streamlit process and two
visitors never wait on one lock. By default the picture is an X/Y plot of strength 0 (the base
alone) beside the chosen strength, same prompt and seed; a visitor can ask for any other plot."""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import DreamloomError
from ..jobs.queue import JobQueue
from .library import Export

STRENGTHENED = ("lora", "hypernetwork")  # kinds a strength applies to (an embedding is a word: on or off)
FLAG = {"lora": "--lora", "hypernetwork": "--hypernetwork", "embedding": "--embedding"}


@dataclass
class TryIt:
    export: Export
    prompt: str
    negative: str = ""
    strength: float = 1.0
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    scheduler: str | None = None
    width: int | None = None
    height: int | None = None
    init_image: Path | None = None
    mask: Path | None = None
    denoise: float = 0.75
    x: str = ""
    y: str = ""


def sample_arguments(t: TryIt, out: Path) -> list[str]:
    """The `dreamloom sample` command line of a try."""
    kind, path = t.export.try_it, t.export.path
    adapter = f"{path}:{t.strength:g}" if kind in STRENGTHENED else str(path)
    args = ["sample", "--base", t.export.base, FLAG[kind], adapter, "--prompt", t.prompt, "--seed", str(t.seed),
            "--steps", str(t.steps), "--guidance", f"{t.guidance:g}", "--out", str(out)]
    args += ["--negative", t.negative] if t.negative else []
    args += ["--scheduler", t.scheduler] if t.scheduler else []
    args += ["--width", str(t.width)] if t.width else []
    args += ["--height", str(t.height)] if t.height else []
    if t.init_image:
        args += ["--init-image", str(t.init_image), "--strength", f"{t.denoise:g}"]
        args += ["--mask", str(t.mask)] if t.mask else []
    y = t.y.strip()
    compare = kind in STRENGTHENED and not y.replace(" ", "").startswith("strength=")  # the base alone beside it
    x = t.x.strip() or (f"strength=0,{t.strength:g}" if compare else "")
    args += ["--x", x] if x else []
    args += ["--y", y] if y else []
    return args


def save_picture(home: Path, data: bytes, what: str) -> Path:
    """An uploaded start picture or mask, checked to be a picture and kept under <home>/tryit/inputs
    (named by its content, so the same upload is stored once)."""
    from PIL import Image

    try:
        Image.open(io.BytesIO(data)).verify()
    except Exception:
        raise DreamloomError(f"the {what} is not a readable picture; upload a PNG or JPEG.") from None
    folder = Path(home) / "tryit" / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}.png"
    if not path.exists():
        Image.open(io.BytesIO(data)).save(path, format="PNG")
    return path


def submit_try(queue: JobQueue, home: Path, t: TryIt, by: str | None = None) -> tuple[int, Path]:
    """Queue the try; (job id, the picture it will write)."""
    if not t.prompt.strip():
        raise DreamloomError("Give a prompt to draw.")
    if t.mask and not t.init_image:
        raise DreamloomError("A mask says which part of a start picture to re-draw; upload the picture too.")
    out = Path(home) / "tryit" / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    return queue.submit_command(f"try {t.export.path.name}", sample_arguments(t, out), by), out


def waiting_line(queue: JobQueue, job_id: int) -> str:
    """Where a try stands, in words: its place in the queue, running, or its error."""
    job = queue.get(job_id)
    if job.state == "queued":
        ahead = sum(1 for j in queue.jobs() if j.state in ("queued", "running") and j.id < job_id)
        return f"Queued: {ahead} job(s) ahead of it." if ahead else "Queued: next for the worker."
    if job.state == "running":
        return "Drawing..."
    if job.state == "failed":
        return f"Failed: {(job.error or '').strip().splitlines()[-1] if job.error else 'no message'}"
    return job.state.capitalize()
