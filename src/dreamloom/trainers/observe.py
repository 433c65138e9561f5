"""What the loop reports and listens to besides training itself: the loss on the training images,
validation samples, peak memory, and the stop requests (SIGTERM, Ctrl-C) it honours with a
checkpoint."""

from __future__ import annotations

import resource
import signal
import threading
from pathlib import Path

import torch

from ..sampling import generate, make_grid
from ..sampling.schedulers import set_scheduler
from .parts import parts_on, unwrapped
from .trackers import log_image


@torch.no_grad()
def measure_loss(method, base, data, n: int = 16) -> float:
    """Loss on the training images with fixed noise and timesteps: comparable across a run."""
    losses = []
    for k in range(n):
        g = torch.Generator().manual_seed(1_000_000 + k)
        losses.append(method.loss(base, data.make_batch([k % len(data.examples)], g)).item())
    return sum(losses) / n


def first_loss(run) -> float | None:
    """The loss measured when the run first started (a resumed run reports against it)."""
    return next((e.get("loss_before") for e in run.events() if e["event"] == "start"), None)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS


def save_samples(run, recipe, base, step: int, accelerator) -> None:
    s = recipe.sample
    prompts = [recipe.fill(p) for p in s.prompts]
    with parts_on(base, accelerator.device), accelerator.autocast():
        pipe = unwrapped(base).pipeline()
        set_scheduler(pipe, s.scheduler)
        images = generate(pipe, prompts, negative_prompt=s.negative_prompt, steps=s.steps,
                          guidance_scale=s.guidance_scale, seed=s.seed, images_per_prompt=s.images_per_prompt,
                          clip_skip=s.clip_skip)
    run.samples.mkdir(exist_ok=True)
    path = run.samples / f"step-{step:08d}.png"
    grid = make_grid(images, cols=s.images_per_prompt)
    grid.save(path)
    run.log("sample", step=step, path=str(path), prompts=prompts, images_per_prompt=s.images_per_prompt,
            scheduler=s.scheduler or "DDIM")
    log_image(accelerator, recipe, "samples", grid, step)


class StopRequest:
    """SIGTERM (a cancel from the job queue, the worker's death, `kill`) and Ctrl-C ask training to
    stop after the current step, with a checkpoint, rather than losing the work since the last one.
    A second Ctrl-C stops at once. A trainer that runs in a thread of another program (a Ray
    worker), where signals cannot be caught, is asked through the run's stop file instead."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, stop_file: Path | None = None):
        self.signalled = False
        self.stop_file = stop_file
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    @property
    def requested(self) -> bool:
        return self.signalled or bool(self.stop_file and self.stop_file.exists())

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.signalled:
                raise KeyboardInterrupt
            print("\nstopping after this step, with a checkpoint (Ctrl-C again to stop at once)", flush=True)
        self.signalled = True

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
