"""The sampler's side of textual inversion: load embedding files of any format (A1111 `.safetensors`
and `.pt`, diffusers `learned_embeds`, SDXL's clip_l / clip_g files) and the embeddings bundled in
pivotal LoRA files, through diffusers' own `load_textual_inversion`, one text encoder at a time.
The prompt word is the file name (A1111, ComfyUI)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import AdapterError
from ..export.embeddings import BUNDLE_PREFIX, SINGLE, read_embedding_file, split_bundle


def made_for(width: int) -> str:
    """Which public family's (first) text encoder is `width` wide."""
    from ..models import ARCHS
    from ..models.family import FAMILIES

    return next((FAMILIES[a.family].title for a in ARCHS.values()
                 if a.version is None and a.text_encoder["hidden_size"] == width), "another architecture")


def layout_family(layout: dict[str, torch.Tensor]) -> str:
    """Which family's embedding files hold one set per text encoder under these keys."""
    from ..models.family import FAMILIES

    return next((f.title for f in FAMILIES.values() if f.embedding_keys and set(layout) <= set(f.embedding_keys.values())),
                "another architecture")


def vectors_for(base, layout: dict[str, torch.Tensor], source) -> dict[str, torch.Tensor]:
    """{text-encoder part: vectors} of a file's layout for this base; AdapterError naming the file and
    both families when it was made for another family, or for another width."""
    family = base.family
    keys = family.embedding_keys
    if keys is None and SINGLE not in layout:
        other = layout_family(layout)
        raise AdapterError(f"embedding '{source}' holds {' and '.join(layout)}: it was made for {other}, but base "
                           f"'{base.spec}' is {family.title}. Pass the {other} base it was trained on with --base.")
    if keys is not None and SINGLE in layout:
        width = layout[SINGLE].shape[-1]
        raise AdapterError(f"embedding '{source}' holds one set of vectors ({width} wide: made for {made_for(width)}), "
                           f"but base '{base.spec}' is {family.title}, whose embeddings hold {' and '.join(keys.values())}. "
                           "Pass the base model it was trained on with --base.")
    vectors = {family.text_encoders[0]: layout[SINGLE]} if keys is None else {p: layout[k] for p, k in keys.items()}
    for part, v in vectors.items():
        width = getattr(base, part).config.hidden_size
        if v.shape[-1] != width:
            raise AdapterError(
                f"embedding '{source}' has vectors {v.shape[-1]} wide (made for {made_for(v.shape[-1])}), but the text "
                f"encoder of base '{base.spec}' is {width} wide. Pass the base model it was trained on with --base.")
    return vectors


def load_embedding(pipe, base, word: str, layout: dict[str, torch.Tensor], source) -> None:
    """Add `word` (all its vectors: word, word_1, ...) to each of the pipeline's tokenizers and text encoders."""
    family = base.family
    for part, vectors in vectors_for(base, layout, source).items():
        tokenizer = getattr(pipe, family.tokenizers[family.text_encoders.index(part)])
        try:
            pipe.load_textual_inversion(vectors, token=word, text_encoder=getattr(pipe, part), tokenizer=tokenizer)
        except ValueError as exc:  # diffusers refuses a word the tokenizer already has
            raise AdapterError(f"embedding '{source}' cannot be loaded as '{word}': {exc}") from exc


def unload_embeddings(pipe, base) -> None:
    """Every loaded embedding out of every tokenizer and text encoder again."""
    family = base.family
    for part, tokenizer in zip(family.text_encoders, family.tokenizers):
        pipe.unload_textual_inversion(tokenizer=getattr(pipe, tokenizer), text_encoder=getattr(pipe, part))


def attach_embeddings(pipe, base, paths: list[str | Path]) -> list[str]:
    """Load each embedding file into the pipeline; returns the prompt words. Every file is read and
    checked before the pipeline is touched."""
    loaded = [(*read_embedding_file(path), path) for path in paths]
    for _, layout, path in loaded:
        vectors_for(base, layout, path)
    for word, layout, path in loaded:
        load_embedding(pipe, base, word, layout, path)
    return [word for word, _, _ in loaded]


def read_bundle(path: Path) -> tuple[dict[str, torch.Tensor] | None, dict[str, dict]]:
    """(the LoRA's tensors without the bundle, {trigger: layout}) of a pivotal LoRA file with bundled
    embeddings; (None, {}) for a plain LoRA, which is then loaded from its file as it is."""
    with safe_open(path, "pt") as f:
        if not any(k.startswith(BUNDLE_PREFIX) for k in f.keys()):
            return None, {}
    return split_bundle(load_file(path))
