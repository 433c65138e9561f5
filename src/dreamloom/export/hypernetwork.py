"""Hypernetwork files: A1111's `.pt` (A1111 and ComfyUI load it) and a `.safetensors` form.

The `.pt` is `torch.save` of a plain dict holding only tensors and primitives, so it loads with
`torch.load(weights_only=True)` (ComfyUI's way): {width: (k_state, v_state), "step": ..., ...},
with the fields in A1111's order. The `.safetensors` holds the same tensors under flat keys
(`768.0.linear.0.weight`: width 768, 0 = k, 1 = v) and every A1111 field as a JSON string in
its header. Only dreamloom's sampler reads that one: A1111 lists only `.pt` hypernetworks, and
ComfyUI loads a `.safetensors` hypernetwork as an empty no-op. See shared FORMATS.md.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from .. import __version__
from ..atomic import atomic_path
from ..errors import AdapterError
from ..models.hypernetwork import PORTABLE_ACTIVATIONS, Hypernetwork, HypernetworkConfig
from .files import cast, refuse_overwrite, write_safetensors

# Every field A1111's Hypernetwork.save writes besides the per-width layers, in its order.
FILE_FIELDS = ("step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
               "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
               "last_layer_dropout", "optional_info")


def file_info(run, base, recipe) -> dict:
    """The fields that describe where a file came from (A1111 shows optional_info)."""
    steps = run.checkpoint_steps()
    return {"step": steps[-1] if steps else recipe.train.steps, "name": recipe.output_name,
            "sd_checkpoint": None, "sd_checkpoint_name": recipe.base.model,
            "optional_info": f"dreamloom {__version__}; base architecture {base.arch.name}"}


def a1111_fields(network: Hypernetwork, info: dict) -> dict:
    fields = {**network.config.fields(), **info}
    return {key: fields[key] for key in FILE_FIELDS}


def save_hypernetwork_pt(path: Path, network: Hypernetwork, info: dict, dtype: str = "fp32",
                         overwrite: bool = False) -> Path:
    refuse_overwrite(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {int(w): (cast(pair[0].state_dict(), dtype), cast(pair[1].state_dict(), dtype))
            for w, pair in network.items()}
    data.update(a1111_fields(network, info))
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def save_hypernetwork_safetensors(path: Path, network: Hypernetwork, info: dict, dtype: str = "fp32",
                                  overwrite: bool = False) -> Path:
    metadata = {key: json.dumps(value) for key, value in a1111_fields(network, info).items()}
    metadata["dreamloom.version"] = __version__
    return write_safetensors(path, cast(network.state_dict(), dtype), metadata, overwrite=overwrite)


def portability_notes(config: HypernetworkConfig) -> list[str]:
    """How A1111 and ComfyUI will treat a file with these settings, where they differ."""
    notes = []
    if config.activation_func not in PORTABLE_ACTIVATIONS:
        notes.append(f"activation '{config.activation_func}': A1111 and dreamloom load this hypernetwork, "
                     "ComfyUI refuses it and leaves the model unpatched.")
    if config.is_layer_norm and config.activation_func != "linear" and not config.activate_output:
        notes.append("layer_norm with an activation: ComfyUI also applies the activation after the last layer, "
                     "A1111 and dreamloom do not, so images differ between the two UIs.")
    if config.use_dropout:
        notes.append("dropout: ComfyUI adds Dropout(0.3) layers of its own and leaves them on while sampling "
                     "(images vary from run to run); A1111 and dreamloom sample without dropout.")
    return notes


def write_hypernetwork_pt(path: Path, run, base, recipe, network, overwrite=False) -> Path:
    path = save_hypernetwork_pt(path, network, file_info(run, base, recipe), recipe.export.dtype, overwrite=overwrite)
    for note in portability_notes(network.config):  # the .pt is the file other UIs load
        run.log("warning", path=str(path), message=note)
        warnings.warn(f"{path.name}: {note}", stacklevel=2)
    return path


def write_hypernetwork_safetensors(path: Path, run, base, recipe, network, overwrite=False) -> Path:
    return save_hypernetwork_safetensors(path, network, file_info(run, base, recipe), recipe.export.dtype,
                                         overwrite=overwrite)


def _read_pt(path: Path) -> tuple[dict, dict]:
    data = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    if not isinstance(data, dict):
        raise ValueError(f"it holds a {type(data).__name__}, not a dict")
    layers = {k: (dict(v[0]), dict(v[1])) for k, v in data.items() if isinstance(k, int)}
    return {k: v for k, v in data.items() if isinstance(k, str)}, layers


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    with safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
        layers: dict[int, tuple[dict, dict]] = {}
        for key in f.keys():
            width, which, name = key.split(".", 2)
            layers.setdefault(int(width), ({}, {}))[int(which)][name] = f.get_tensor(key)
    return {k: json.loads(v) for k, v in metadata.items() if k in FILE_FIELDS}, layers


def load_hypernetwork_file(path: str | Path) -> tuple[dict, dict[int, tuple[dict, dict]]]:
    """(A1111 fields, {width: (k_state, v_state)}) from a `.pt` or `.safetensors` hypernetwork."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AdapterError(f"hypernetwork file '{path}' does not exist.")
    try:
        fields, layers = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pt(path)
    except Exception as exc:
        raise AdapterError(
            f"'{path}' cannot be read as a hypernetwork ({type(exc).__name__}: {exc}). dreamloom reads A1111 "
            "`.pt` hypernetworks that hold only tensors and plain values, and its own `.safetensors` form.") from exc
    if not layers:
        raise AdapterError(f"'{path}' is not a hypernetwork: it has no per-width layers (keys like 768 or 320).")
    return fields, layers
