"""The base sampler: a base model plus any LoRA files at their strengths -> images."""

from __future__ import annotations

from pathlib import Path

from .lora_files import check_lora_fits, resolve_lora_path


def attach_loras(pipe, base, loras: list[tuple[str | Path, float]]) -> None:
    """Load each LoRA (kohya or diffusers format) into the pipeline at its strength."""
    names, scales = [], []
    for i, (spec, scale) in enumerate(loras):
        path = resolve_lora_path(spec)
        check_lora_fits(path, base)
        name = f"lora{i}"
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        names.append(name)
        scales.append(scale)
    if names:
        pipe.set_adapters(names, adapter_weights=scales)


def parse_weighted(spec: str) -> tuple[str, float]:
    """`path:0.8` -> (path, 0.8); a bare path means strength 1.0."""
    path, sep, scale = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0
