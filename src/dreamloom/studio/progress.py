"""What the Jobs page shows about a run while it trains and after: progress, ETA, the loss curve,
the latest validation samples, the log tail. Read from the run's events.jsonl and the job's log."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..rundir import RunDir

RATE_WINDOW = 10  # step events the it/s for the ETA is averaged over


@dataclass(frozen=True)
class RunProgress:
    step: int
    total: int | None  # known once the trainer has started
    eta_s: float | None
    losses: list[tuple[int, float]]
    latest_sample: Path | None
    error: str | None  # the trainer's own error event, if it wrote one
    exports: list[Path]
    validation: list[tuple[int, float]] = ()  # the held-out pictures' loss at each checkpoint
    samples: list[dict] = ()  # the sample events whose picture exists, oldest first
    checkpoints: list[int] = ()  # steps of the checkpoints the run holds now

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0


def run_progress(run_dir: str | Path | None) -> RunProgress:
    events = RunDir(Path(run_dir)).events() if run_dir else []
    total, error, sample, exports = None, None, None, []
    steps, validation, samples = [], {}, {}
    for event in events:
        kind = event.get("event")
        if kind == "start":  # a new attempt: what an earlier one failed with is history
            total, error = event.get("steps"), None
        elif kind == "step":
            steps.append(event)
        elif kind == "sample" and Path(event.get("path", "")).is_file():
            sample = Path(event["path"])
            samples[event["step"]] = event  # a resumed run draws a step again: the latest counts
        elif kind == "validation":
            validation[event["step"]] = event["loss"]
        elif kind == "error":
            error = event.get("message")
        elif kind == "export":
            exports = [Path(p) for p in event.get("paths", [])]
    step = steps[-1]["step"] if steps else 0
    rates = [e["it_s"] for e in steps[-RATE_WINDOW:] if e.get("it_s")]
    eta = (total - step) / (sum(rates) / len(rates)) if total and rates and step < total else None
    losses = [(e["step"], e["loss"]) for e in steps if e.get("loss") is not None]
    checkpoints = RunDir(Path(run_dir)).checkpoint_steps() if run_dir and Path(run_dir).is_dir() else []
    return RunProgress(step, total, eta, losses, sample, error, exports, sorted(validation.items()),
                       [samples[k] for k in sorted(samples)], checkpoints)


def checkpoint_grid(samples: list[dict]):
    """The first picture of every prompt at every sampled step: rows = prompts, columns = steps
    (same prompts and seeds at each, so the columns compare), each column headed by its step."""
    from PIL import Image, ImageDraw

    if not samples:
        return None
    grids = [Image.open(e["path"]).convert("RGB") for e in samples]
    rows = max(len(e.get("prompts", [])) for e in samples) or 1
    per_row = samples[0].get("images_per_prompt", 1)
    cell_w, cell_h = grids[0].width // per_row, grids[0].height // rows
    label = 14
    sheet = Image.new("RGB", (cell_w * len(grids), label + cell_h * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for column, (event, grid) in enumerate(zip(samples, grids)):
        draw.text((column * cell_w + 2, 1), f"step {event['step']}", fill="black")
        for row in range(min(rows, grid.height // cell_h)):
            cell = grid.crop((0, row * cell_h, cell_w, (row + 1) * cell_h))
            sheet.paste(cell, (column * cell_w, label + row * cell_h))
    return sheet


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "estimating..."
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return ""
    with open(path, "rb") as f:  # only the end: a long run's log can be large
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])
