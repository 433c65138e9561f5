"""`dreamloom lora merge`: LoRA/LyCORIS files at strengths into a base (a single-file checkpoint), or
into one LoRA file (ranks concatenated, or the summed difference by SVD to a target rank).

The per-layer difference is the sampler's own (kohya_patch: LyCORIS's math, as A1111/ComfyUI apply
it), so a merged checkpoint draws what the base with those LoRAs at those strengths draws."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import AdapterError
from ..export.files import refuse_overwrite
from ..export.ldm_checkpoint import save_single_file
from ..models import load_base
from ..sampling import kohya_patch
from ..sampling.sampler import parse_weighted
from .files import family_of, family_title, read_kohya, write_lora
from .lowrank import Pair, factor
from .resize import plain_pairs


def read_inputs(specs: list[str]) -> list[tuple[Path, float, dict, dict]]:
    """(path, strength, tensors, metadata) per `file[:strength]`; files of two families are refused."""
    inputs = []
    for spec in specs:
        name, strength = parse_weighted(spec)
        path, tensors, metadata = read_kohya(name)
        inputs.append((path, strength, tensors, metadata))
    made = {p: family_of(m, t) for p, _, t, m in inputs}
    families = {family_title(m) for m in made.values() if m != "unknown"}
    if len(families) > 1:
        listing = ", ".join(f"'{p}' ({m})" for p, m in made.items())
        raise AdapterError(f"These LoRAs were made for different model families and cannot be merged: {listing}. "
                           "Merge only files made for the same base family.")
    return inputs


def record(inputs) -> dict[str, str]:
    """What went in, for the output's metadata."""
    return {"dreamloom.merged_from": json.dumps([
        {"file": p.name, "strength": s, "hash": m.get("sshs_model_hash", ""), "title": m.get("modelspec.title", "")}
        for p, s, _, m in inputs])}


def deltas(inputs, base) -> dict[str, torch.Tensor]:
    """{kohya module: sum of strength * dW} over the files, each checked against the base first."""
    built = [(s, kohya_patch.adapter_modules(t), kohya_patch.build(p, base, t)) for p, s, t, _ in inputs]
    total: dict[str, torch.Tensor] = {}
    for strength, modules, layers in built:
        for name, (layer, lyco) in zip(modules, layers):  # build keeps the file's module order
            dw = strength * kohya_patch.delta(lyco, layer.weight)
            total[name] = total[name] + dw if name in total else dw
    return total


def merge_into_base(specs: list[str], base_spec: str, out: Path, dtype: str, overwrite: bool) -> Path:
    refuse_overwrite(out, overwrite)
    inputs = read_inputs(specs)
    base = load_base(base_spec)
    built = [(s, kohya_patch.build(p, base, t)) for p, s, t, _ in inputs]  # all checked before any change
    for strength, layers in built:
        kohya_patch.apply(layers, strength)
    return save_single_file(base, out, dtype=dtype, metadata={**record(inputs), "dreamloom.merged_base": base_spec},
                            overwrite=overwrite)


def concatenated(inputs) -> dict[str, tuple[Pair, float]]:
    """Plain LoRA files side by side: down rows and up columns stacked, each file's strength * alpha / rank
    folded into its up, alpha = total rank (scale 1). Exact, with rank = sum of the ranks."""
    stacks: dict[str, list] = {}
    for path, strength, tensors, _ in inputs:
        for name, (down, up, alpha) in plain_pairs(path, tensors).items():
            scale = strength * alpha / down.shape[0]
            stacks.setdefault(name, []).append((down.float(), up.float() * scale))
    out = {}
    for name, parts in stacks.items():
        down = torch.cat([d for d, _ in parts], 0)
        up = torch.cat([u for _, u in parts], 1)
        out[name] = (Pair(down, up, down.shape[0], 0.0), float(down.shape[0]))
    return out


def merge_into_lora(specs: list[str], out: Path, *, base_spec: str | None, rank: int | None, energy: float | None,
                    dtype: str, overwrite: bool, report=print) -> Path:
    refuse_overwrite(out, overwrite)
    inputs = read_inputs(specs)
    arch = base_spec or next((m["dreamloom.arch"] for *_, m in inputs if "dreamloom.arch" in m), None)
    if rank is None and energy is None:
        pairs = concatenated(inputs)
        if arch is None:
            raise AdapterError("Pass --base: the merged file's metadata names the base family it was made for.")
        base = load_base(arch)
    else:
        if arch is None:
            raise AdapterError("Pass --base: merging by SVD computes each layer's difference on the base's weights.")
        base = load_base(arch)
        pairs = {}
        for name, delta in deltas(inputs, base).items():
            pair = factor(delta, rank=rank, energy=energy)
            pairs[name] = (pair, float(pair.rank))
            report(f"{name}: rank {pair.rank}, relative error {pair.error:.2e}")
    return write_lora(out, base, pairs, dtype, record(inputs), overwrite)
