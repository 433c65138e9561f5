"""The Library's try-it panel: the same prompt and seed through the base alone and the base with an
adapter, side by side. Sampling is not training, so it runs in the studio process; the adapter is
taken off again afterwards, because the base is loaded once and shared by every visitor."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from ..sampling import generate
from ..sampling.attach import attach_file

# One sampling at a time on the shared base: two visitors must not see each other's adapters.
SAMPLING_LOCK = threading.Lock()


@contextmanager
def adapter_on(pipe, base, path: Path, kind: str, strength: float):
    """The adapter applied to the pipeline for the duration of the block, then removed."""
    detach = attach_file(kind, pipe, base, path, strength)
    try:
        yield
    finally:
        detach()


def compare(base, path: Path, kind: str, strength: float, prompt: str, seed: int = 0, steps: int = 20,
            guidance_scale: float = 7.5) -> tuple[Image.Image, Image.Image]:
    """(base alone, base with the adapter at `strength`), same prompt, seed and settings."""
    with SAMPLING_LOCK:
        pipe = base.pipeline()
        alone = generate(pipe, [prompt], steps=steps, guidance_scale=guidance_scale, seed=seed)[0]
        with adapter_on(pipe, base, Path(path), kind, strength):
            with_adapter = generate(pipe, [prompt], steps=steps, guidance_scale=guidance_scale, seed=seed)[0]
    return alone, with_adapter
