"""The base sampler: a base model plus any LoRA files at their strengths -> images."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from ..errors import AdapterError
from .embeddings import load_embedding, read_bundle, unload_embeddings
from .lora_files import check_diffusers_lora_fits, read_lora, resolve_lora_path

MAX_STRENGTH = 10.0  # ComfyUI's sliders go further, but beyond this pictures are noise, not style


def attach_loras(pipe, base, loras: list[tuple[str | Path, float]]) -> Callable[[], None]:
    """Apply each LoRA file at its strength: a kohya-layout file (LoRA, LoCon, LoHa, LoKr, DoRA) is
    patched into the layers' weights as A1111 and ComfyUI do it; a diffusers file goes through
    diffusers' own load_lora_weights. The embeddings a pivotal file bundles (`bundle_emb.*`) are
    loaded at full strength, as A1111 does. Every file is checked before the base changes; returns
    what undoes it all."""
    from safetensors.torch import load_file

    from . import kohya_patch

    checked = []  # every file is read and checked before the base changes
    for spec, scale in loras:
        path = resolve_lora_path(spec)
        layout, shapes, metadata = read_lora(path, base)
        lora, bundled = read_bundle(path)
        if layout == "kohya":
            built = kohya_patch.build(path, base, lora if lora is not None else load_file(path))
        else:
            check_diffusers_lora_fits(path, base, shapes, metadata)
            built = None
        checked.append((path, scale, built, bundled))
    undo, names, scales = [], [], []
    for i, (path, scale, built, bundled) in enumerate(checked):
        if built is not None:
            undo.append(kohya_patch.apply(built, scale))
        else:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"lora{i}")
            names.append(f"lora{i}")
            scales.append(scale)
        for word, layout in bundled.items():
            load_embedding(pipe, base, word, layout, f"{path} (bundled)")
        if bundled:
            undo.append(lambda: unload_embeddings(pipe, base))
    if names:
        pipe.set_adapters(names, adapter_weights=scales)
        undo.append(pipe.unload_lora_weights)

    def detach() -> None:
        for step in reversed(undo):
            step()
    return detach


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
