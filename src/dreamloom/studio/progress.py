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

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0


def run_progress(run_dir: str | Path | None) -> RunProgress:
    events = RunDir(Path(run_dir)).events() if run_dir else []
    total, error, sample, exports = None, None, None, []
    steps = []
    for event in events:
        kind = event.get("event")
        if kind == "start":  # a new attempt: what an earlier one failed with is history
            total, error = event.get("steps"), None
        elif kind == "step":
            steps.append(event)
        elif kind == "sample" and Path(event.get("path", "")).is_file():
            sample = Path(event["path"])
        elif kind == "error":
            error = event.get("message")
        elif kind == "export":
            exports = [Path(p) for p in event.get("paths", [])]
    step = steps[-1]["step"] if steps else 0
    rates = [e["it_s"] for e in steps[-RATE_WINDOW:] if e.get("it_s")]
    eta = (total - step) / (sum(rates) / len(rates)) if total and rates and step < total else None
    losses = [(e["step"], e["loss"]) for e in steps if e.get("loss") is not None]
    return RunProgress(step, total, eta, losses, sample, error, exports)


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
