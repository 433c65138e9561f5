"""The sampler's side of textual inversion: load embedding files of any format (A1111 `.safetensors`
and `.pt`, diffusers `learned_embeds`) and the embeddings bundled in pivotal LoRA files, through
diffusers' own `load_textual_inversion`. The prompt word is the file name (A1111, ComfyUI)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import AdapterError
from ..export.embeddings import BUNDLE_PREFIX, read_embedding_file, split_bundle

def made_for(width: int) -> str:
    """Which public family's text encoder is `width` wide."""
    from ..models import ARCHS
    from ..models.family import FAMILIES

    return next((FAMILIES[a.family].title for a in ARCHS.values()
                 if a.version is None and a.text_encoder["hidden_size"] == width), "another architecture")


def check_width(vectors: torch.Tensor, pipe, base, source) -> None:
    width = pipe.text_encoder.config.hidden_size
    if vectors.shape[-1] != width:
        made_for_ = made_for(vectors.shape[-1])
        raise AdapterError(
            f"embedding '{source}' has vectors {vectors.shape[-1]} wide (made for {made_for_}), but the text encoder "
            f"of base '{base.spec}' is {width} wide. Pass the base model it was trained on with --base.")


def load_embedding(pipe, base, word: str, vectors: torch.Tensor, source) -> None:
    """Add `word` (all its vectors: word, word_1, ...) to the pipeline's tokenizer and text encoder."""
    check_width(vectors, pipe, base, source)
    try:
        pipe.load_textual_inversion(vectors, token=word)
    except ValueError as exc:  # diffusers refuses a word the tokenizer already has
        raise AdapterError(f"embedding '{source}' cannot be loaded as '{word}': {exc}") from exc


def attach_embeddings(pipe, base, paths: list[str | Path]) -> list[str]:
    """Load each embedding file into the pipeline; returns the prompt words. Every file is read and
    checked before the pipeline is touched."""
    loaded = [(*read_embedding_file(path), path) for path in paths]
    for _, vectors, path in loaded:
        check_width(vectors, pipe, base, path)
    for word, vectors, path in loaded:
        load_embedding(pipe, base, word, vectors, path)
    return [word for word, _, _ in loaded]


def read_bundle(path: Path) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
    """(the LoRA's tensors without the bundle, {trigger: vectors}) of a pivotal LoRA file with bundled
    embeddings; (None, {}) for a plain LoRA, which is then loaded from its file as it is."""
    with safe_open(path, "pt") as f:
        if not any(k.startswith(BUNDLE_PREFIX) for k in f.keys()):
            return None, {}
    return split_bundle(load_file(path))
