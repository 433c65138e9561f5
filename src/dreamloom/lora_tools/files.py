"""Writing a kohya-layout LoRA made by the tools, with the metadata A1111/Forge/ComfyUI read and a
record of what went in; and reading the files the tools take in."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from .. import __version__
from ..errors import AdapterError
from ..export.files import cast, tensor_data_sha256, write_safetensors
from ..sampling.lora_files import made_for, read_lora, resolve_lora_path
from .lowrank import Pair


def read_kohya(spec: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """(path, tensors, metadata) of a kohya-layout file; a diffusers-layout file is refused by name."""
    path = resolve_lora_path(spec)
    layout, _, metadata = read_lora(path)
    if layout != "kohya":
        raise AdapterError(f"'{path}' is a diffusers-layout LoRA; the lora tools read kohya-layout files "
                           "(lora_unet_...). Export the run in kohya format (dreamloom export RUN --format kohya).")
    return path, load_file(path), metadata


def prefix_family(keys) -> str | None:
    """The one family whose own kohya prefixes (not the shared lora_unet_) a file's keys carry, e.g.
    SDXL for lora_te1_; None when the keys do not tell."""
    from ..models.family import FAMILIES

    shared = "lora_unet_"
    hits = [f.title for f in FAMILIES.values()
            if any(k.startswith(p) for k in keys for p in f.kohya_prefixes.values() if p != shared)]
    return hits[0] if len(hits) == 1 else None


def family_of(metadata: dict[str, str], keys) -> str:
    """`tiny-xl (SDXL)`-style name of what a file was made for: its metadata, else its key prefixes."""
    made = made_for(metadata)
    return made if made != "unknown" else (prefix_family(keys) or "unknown")


def family_title(made: str) -> str:
    """The family part of `made_for`'s answer (`SDXL` of `tiny-xl (SDXL)`), else the whole."""
    return made.rsplit("(", 1)[-1].rstrip(")") if "(" in made else made


def pair_tensors(pairs: dict[str, tuple[Pair, float]]) -> dict[str, torch.Tensor]:
    """{module: (pair, alpha)} -> kohya keys."""
    out = {}
    for name, (pair, alpha) in pairs.items():
        out[f"{name}.lora_down.weight"] = pair.down
        out[f"{name}.lora_up.weight"] = pair.up
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def lora_metadata(base, pairs: dict[str, tuple[Pair, float]], title: str, extra: dict[str, str]) -> dict[str, str]:
    """kohya's fields for a plain LoRA/LoCon file; rank and alpha are "Dynamic" when layers differ, as
    kohya's resize_lora.py writes them (each layer's `.alpha` then carries its scale)."""
    family, arch = base.family, base.arch
    ranks = {p.rank for p, _ in pairs.values()}
    alphas = {float(a) for _, a in pairs.values()}
    v_pred = base.prediction_type == "v_prediction"
    convs = [p for p in pairs.values() if p[0].down.dim() == 4]
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic",
        "ss_base_model_version": family.version(arch, v_pred),
        "ss_v2": str(family.v2),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.modelspec_architecture(arch)}/lora",
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": title,
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.resolution": f"{arch.resolution}x{arch.resolution}",
        "dreamloom.version": __version__,
        "dreamloom.arch": arch.name,
        **extra,
    }
    if convs:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(max(p.rank for p, _ in convs)),
                                              "conv_alpha": f"{max(float(a) for _, a in convs):g}"})
    return meta


def write_lora(path: Path, base, pairs: dict[str, tuple[Pair, float]], dtype: str, extra: dict[str, str],
               overwrite: bool, keep: dict[str, str] | None = None, over: dict[str, str] | None = None) -> Path:
    """Atomically, never over an existing file unless `overwrite`; `keep` = metadata carried over from
    the input (trigger phrase, tag frequency), under ours; `over` = the input's, over ours."""
    if not pairs:
        raise AdapterError(f"Nothing to write to '{path}': no layer differs (is the model the same as its base?).")
    tensors = cast(pair_tensors(pairs), dtype)
    meta = {**(keep or {}), **lora_metadata(base, pairs, path.stem, extra), **(over or {})}
    meta["sshs_model_hash"] = tensor_data_sha256(save(tensors))
    return write_safetensors(path, tensors, meta, overwrite=overwrite)


def carried_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """What describes the subject rather than the file's shape: kept by resize."""
    keys = ("ss_tag_frequency", "modelspec.trigger_phrase", "ss_resolution", "ss_steps", "ss_sd_model_name",
            "ss_learning_rate", "modelspec.description")
    return {k: metadata[k] for k in keys if k in metadata}


FAMILY_FIELDS = ("ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.prediction_type",
                 "modelspec.resolution", "dreamloom.arch")


def family_fields(metadata: dict[str, str]) -> dict[str, str]:
    """What an input says about its base, kept as it was when no base was given (an SD 2 file stays
    epsilon or v as it says, whichever architecture stood in for its family)."""
    return {k: metadata[k] for k in FAMILY_FIELDS if k in metadata}
