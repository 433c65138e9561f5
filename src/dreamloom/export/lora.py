"""LoRA exports: the kohya layout (A1111, Forge, ComfyUI, InvokeAI) and diffusers/PEFT.

See shared FORMATS.md. kohya keys are `lora_unet_<module path with _>` / `lora_te_...` with
`.lora_down.weight`, `.lora_up.weight` and the real `.alpha`; diffusers keys keep the peft names
and carry rank/alpha in the `lora_adapter_metadata` header.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save

from .. import __version__
from .files import cast, refuse_overwrite, tensor_data_sha256, write_safetensors

PEFT_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                 "lora_magnitude_vector": "dora_scale"}
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for a LoRA file


def kohya_tensors(base, parts: dict[str, dict[str, torch.Tensor]], configs) -> dict[str, torch.Tensor]:
    """peft-named adapter weights per part in kohya's layout, each module with the alpha it trained
    with (configs: the part's peft LoraConfig). DoRA's magnitude becomes LyCORIS's `dora_scale`,
    one norm per output channel ([out, 1] / [out, 1, 1, 1]), the layout A1111 and ComfyUI read."""
    out = {}
    for part, state in parts.items():
        config = configs[part]
        for key, tensor in state.items():
            module, suffix = next((key.removesuffix("." + s), s) for s in PEFT_TO_KOHYA if key.endswith("." + s))
            name = base.family.kohya_name(base, part, module)
            if suffix == "lora_magnitude_vector":
                down = state[f"{module}.lora_A.weight"]
                tensor = tensor.reshape(-1, *[1] * (down.dim() - 1))
            out[f"{name}.{PEFT_TO_KOHYA[suffix]}"] = tensor
            out[f"{name}.alpha"] = torch.tensor(float(config.alpha_pattern.get(module, config.lora_alpha)))
    return out


def tag_frequency(run, recipe) -> str:
    """kohya's ss_tag_frequency: comma-separated caption tags counted per dataset folder."""
    counts = Counter()
    for item in run.dataset_manifest():
        counts.update(t.strip() for t in item["caption"].split(",") if t.strip())
    return json.dumps({Path(recipe.data.path).name or "data": dict(counts)})


def kohya_metadata(run, base, recipe, blob_hash: str, network_args: dict[str, str]) -> dict[str, str]:
    """What A1111/Forge need to list the file under its base, and kohya's other fields. A LyCORIS
    algorithm (network_args["algo"]) is named the way LyCORIS's own kohya module names it."""
    arch, family, res = base.arch, base.family, recipe.data.resolution
    v_pred = base.prediction_type == "v_prediction"
    meta = {
        "ss_network_module": "lycoris.kohya" if "algo" in network_args else "networks.lora",
        "ss_network_dim": recipe.lora.rank,
        "ss_network_alpha": recipe.lora.alpha,
        "ss_base_model_version": family.version(arch, v_pred),
        "ss_v2": str(family.v2),
        "ss_output_name": recipe.output_name,
        "ss_resolution": f"({res}, {res})",
        "ss_steps": recipe.train.steps,
        "ss_learning_rate": recipe.train.learning_rate,
        "ss_sd_model_name": recipe.base.model,
        "ss_tag_frequency": tag_frequency(run, recipe),
        "sshs_model_hash": blob_hash,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.modelspec_architecture(arch)}/lora",
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": recipe.output_name,
        "modelspec.trigger_phrase": recipe.data.trigger,
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.resolution": f"{res}x{res}",
        "dreamloom.version": __version__,
        "dreamloom.arch": arch.name,
    }
    if network_args:
        meta["ss_network_args"] = json.dumps(network_args)
    return meta


def write_kohya_lora(path: Path, run, base, recipe, tensors: dict[str, torch.Tensor], network_args: dict[str, str],
                     overwrite=False) -> Path:
    """A kohya-layout file of these tensors (a pivotal run adds its bundled embedding to them)."""
    refuse_overwrite(path, overwrite)
    tensors = cast(tensors, recipe.export.dtype)
    metadata = kohya_metadata(run, base, recipe, tensor_data_sha256(save(tensors)), network_args)
    metadata["ss_output_name"] = metadata["modelspec.title"] = path.stem  # what UIs show: the file's own name
    return write_safetensors(path, tensors, metadata, overwrite=overwrite)


def write_diffusers_lora(path: Path, base, dtype: str, parts, configs, overwrite=False) -> Path:
    """diffusers' own writer (`save_lora_weights` of the base's pipeline class): keys `unet.` /
    `text_encoder.` / ..., rank and alpha in `lora_adapter_metadata` so that alpha != rank reloads right."""
    refuse_overwrite(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    family, kwargs = base.family, {}
    for part, state in parts.items():
        kwargs[f"{part}_lora_layers"] = cast({family.canonical(part, k): v for k, v in state.items()}, dtype)
        kwargs[f"{part}_lora_adapter_metadata"] = configs[part].to_dict()
    family.pipeline_class.save_lora_weights(path.parent, weight_name=path.name, **kwargs)
    return path
