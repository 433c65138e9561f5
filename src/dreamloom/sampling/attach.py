"""Putting an exported file on a base's pipeline, by the kind its method's format declares
(`Format.attach`): the one way `dreamloom eval`, the try-it panel and a method's own sampling
model do it. Each returns what takes it off again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def attach_file(kind: str, pipe, base, path: Path, strength: float) -> Callable[[], None]:
    if kind == "lora":
        from .sampler import attach_loras

        return attach_loras(pipe, base, [(path, strength)])
    if kind == "hypernetwork":
        from .hypernetwork import attach_hypernetworks

        processors = pipe.unet.attn_processors
        attach_hypernetworks(pipe, base, [(path, strength)])
        return lambda: pipe.unet.set_attn_processor(processors)
    if kind == "embedding":  # a new word has no strength: any strength above 0 turns it on
        from .embeddings import attach_embeddings, unload_embeddings

        if strength <= 0:
            return lambda: None
        attach_embeddings(pipe, base, [path])
        return lambda: unload_embeddings(pipe, base)
    raise ValueError(f"no sampler attaches a {kind!r} file")
