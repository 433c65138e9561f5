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

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
PEFT_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
DIFFUSERS_DIR = "diffusers"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


def canonical(part: str, key: str) -> str:
    """Module paths as every other tool spells them. transformers 5 dropped CLIPTextModel's
    `text_model.` level; A1111, ComfyUI and older diffusers all still expect it."""
    if part == "text_encoder" and not key.startswith("text_model."):
        return f"text_model.{key}"
    return key


def to_kohya(parts: dict[str, dict[str, torch.Tensor]], alpha: float) -> dict[str, torch.Tensor]:
    out = {}
    for part, state in parts.items():
        for key, tensor in state.items():
            module, _, suffix = canonical(part, key).removesuffix(".weight").rpartition(".")
            name = KOHYA_PREFIX[part] + module.replace(".", "_")
            out[f"{name}.{PEFT_TO_KOHYA[suffix + '.weight']}"] = tensor
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def tag_frequency(run, recipe) -> str:
    """kohya's ss_tag_frequency: comma-separated caption tags counted per dataset folder."""
    counts = Counter()
    for item in run.dataset_manifest():
        counts.update(t.strip() for t in item["caption"].split(",") if t.strip())
    return json.dumps({Path(recipe.data.path).name or "data": dict(counts)})


def kohya_metadata(run, base, recipe, blob_hash: str) -> dict[str, str]:
    arch, res = base.arch, recipe.data.resolution
    v_pred = base.prediction_type == "v_prediction"
    version = {"sd_v1": "sd_v1", "sd_v2": "sd_v2_v" if v_pred else "sd_v2"}.get(arch.family, arch.family)
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": recipe.lora.rank,
        "ss_network_alpha": recipe.lora.alpha,
        "ss_base_model_version": version,
        "ss_v2": str(arch.family == "sd_v2"),
        "ss_output_name": recipe.output_name,
        "ss_resolution": f"({res}, {res})",
        "ss_steps": recipe.train.steps,
        "ss_learning_rate": recipe.train.learning_rate,
        "ss_sd_model_name": recipe.base.model,
        "ss_tag_frequency": tag_frequency(run, recipe),
        "sshs_model_hash": blob_hash,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch.modelspec_architecture}/lora",
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": recipe.output_name,
        "modelspec.trigger_phrase": recipe.data.trigger,
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.resolution": f"{res}x{res}",
        "dreamloom.version": __version__,
        "dreamloom.arch": arch.name,
    }


def write_kohya_lora(run, base, recipe, parts, overwrite=False, name=None, extra=None) -> Path:
    """`extra` tensors ride along under their own keys (a pivotal run's bundled embedding)."""
    name = name or recipe.output_name
    path = run.exports / f"{name}.safetensors"
    refuse_overwrite(path, overwrite)
    tensors = cast({**to_kohya(parts, recipe.lora.alpha), **(extra or {})}, recipe.export.dtype)
    metadata = kohya_metadata(run, base, recipe, tensor_data_sha256(save(tensors)))
    metadata["ss_output_name"] = metadata["modelspec.title"] = name  # what UIs show: the file's own name
    return write_safetensors(path, tensors, metadata, overwrite=overwrite)


def write_diffusers_lora(run, recipe, parts, configs, overwrite=False) -> Path:
    from diffusers import StableDiffusionPipeline

    folder = run.exports / DIFFUSERS_DIR
    path = folder / DIFFUSERS_FILE
    refuse_overwrite(path, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {part: cast({canonical(part, k): v for k, v in state.items()}, recipe.export.dtype)
               for part, state in parts.items()}
    # diffusers writes rank/alpha into `lora_adapter_metadata`, so alpha != rank reloads right.
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=tensors["unet"],
        text_encoder_lora_layers=tensors.get("text_encoder"),
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict() if "text_encoder" in configs else None,
        weight_name=DIFFUSERS_FILE,
    )
    return path
