"""The base sampler: a base model plus any LoRA files at their strengths -> images."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import AdapterError
from .embeddings import load_embedding, read_bundle
from .lora_files import check_lora_fits, resolve_lora_path


def attach_loras(pipe, base, loras: list[tuple[str | Path, float]]) -> None:
    """Load each LoRA (kohya or diffusers format) into the pipeline at its strength, and the
    embeddings a pivotal LoRA file bundles (`bundle_emb.*`) at full strength, as A1111 does."""
    names, scales = [], []
    for i, (spec, scale) in enumerate(loras):
        path = resolve_lora_path(spec)
        check_lora_fits(path, base)
        name = f"lora{i}"
        lora, bundled = read_bundle(path)
        if lora is None:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        else:  # diffusers does not know the bundle keys: hand it the LoRA alone
            pipe.load_lora_weights(lora, adapter_name=name)
        for word, vectors in bundled.items():
            load_embedding(pipe, base, word, vectors, f"{path} (bundled)")
        names.append(name)
        scales.append(scale)
    if names:
        pipe.set_adapters(names, adapter_weights=scales)


MAX_STRENGTH = 10.0  # ComfyUI's sliders go further, but beyond this pictures are noise, not style


def parse_weighted(spec: str) -> tuple[str, float]:
    """`path:0.8` -> (path, 0.8); a bare path means strength 1.0. A strength that is not a finite
    number within +-MAX_STRENGTH is refused (NaN would silently draw garbage)."""
    path, sep, text = spec.rpartition(":")
    if not (sep and path):
        return spec, 1.0
    try:
        strength = float(text)
    except ValueError:
        return spec, 1.0  # a ':' inside the path itself
    if not math.isfinite(strength) or abs(strength) > MAX_STRENGTH:
        raise AdapterError(f"'{spec}': strength {text!r} must be a finite number from -{MAX_STRENGTH:g} to "
                           f"{MAX_STRENGTH:g} (1 is as trained, 0 is off), e.g. {path}:0.8.")
    return path, strength
