"""`dreamloom lora resize`: a LoRA/LoCon file to a lower rank by SVD of each layer's up @ down.

Each layer keeps its scale: kohya applies up @ down * alpha / rank, so the new alpha is
alpha * new_rank / rank (kohya's resize_lora.py does the same), and the file means what it meant."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import AdapterError
from ..export.files import refuse_overwrite
from ..models import ARCHS, build_random, load_base
from .files import carried_metadata, family_fields, read_kohya, write_lora
from .lowrank import Pair, factor, product


def plain_pairs(path: Path, tensors) -> dict[str, tuple[object, object, float]]:
    """{module: (down, up, alpha)}; any other LyCORIS type is refused with the way to convert it."""
    modules = {}
    for key in tensors:
        name, _, suffix = key.partition(".")
        modules.setdefault(name, set()).add(suffix)
    out = {}
    for name, suffixes in modules.items():
        if not {"lora_down.weight", "lora_up.weight"} <= suffixes or suffixes - {"lora_down.weight",
                                                                                 "lora_up.weight", "alpha"}:
            raise AdapterError(
                f"'{path}': layer {name} is not a plain LoRA/LoCon pair (keys {sorted(suffixes)}); only plain "
                f"lora_down/lora_up files are read here. Turn it into one by SVD: dreamloom lora merge {path} "
                "--to-lora --base BASE --rank N --out OUT.safetensors")
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(down.shape[0])
        out[name] = (down, up, alpha)
    return out


def arch_of_version(version: str | None) -> str | None:
    """The first architecture whose kohya base version is `version` (another tool's file names only that)."""
    from ..models.family import FAMILIES

    return next((name for name, arch in ARCHS.items() for v_pred in (False, True)
                 if version and FAMILIES[arch.family].version(arch, v_pred) == version), None)


def resize(spec: str, out: Path, *, rank: int | None, energy: float | None, base_spec: str | None,
           dtype: str, overwrite: bool, report=print) -> Path:
    refuse_overwrite(out, overwrite)
    path, tensors, metadata = read_kohya(spec)
    layers = plain_pairs(path, tensors)
    largest = max(d.shape[0] for d, _, _ in layers.values())
    if rank is not None and rank > largest:
        raise AdapterError(f"--rank {rank} is above the rank of '{path}' ({largest}); resize only lowers a rank. "
                           f"Choose --rank {largest} or less.")
    arch = base_spec or metadata.get("dreamloom.arch") or arch_of_version(metadata.get("ss_base_model_version"))
    if not arch:
        raise AdapterError(f"'{path}' does not say which base it was made for; pass it with --base "
                           "(e.g. --base runwayml/stable-diffusion-v1-5 or a checkpoint file).")
    # only the family's metadata fields are needed: a named architecture is built without weights
    base = build_random(ARCHS[arch], meta=True) if arch in ARCHS and not base_spec else load_base(arch)
    pairs: dict[str, tuple[Pair, float]] = {}
    for name, (down, up, alpha) in layers.items():
        old = down.shape[0]
        pair = factor(product(down, up), rank=min(rank, old) if rank else None, energy=energy)
        pairs[name] = (pair, alpha * pair.rank / old)  # same alpha / rank: the same scale
        report(f"{name}: rank {old} -> {pair.rank}, relative error {pair.error:.2e}")
    extra = {"dreamloom.resized_from": json.dumps({"file": path.name, "hash": metadata.get("sshs_model_hash", ""),
                                                   "rank": rank, "energy": energy})}
    return write_lora(out, base, pairs, dtype, extra, overwrite, keep=carried_metadata(metadata),
                      over=None if base_spec else family_fields(metadata))
