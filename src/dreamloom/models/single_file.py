"""Loading a single-file checkpoint (original LDM layout: A1111 / ComfyUI / our own exports).

The architecture is recognised from the tensor names and shapes in the file, and diffusers'
`from_single_file` is handed a config folder written here for it, so that it never asks the hub
for one. `.ckpt` pickles are only ever opened with `weights_only=True`: code in them never runs.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import zipfile
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from transformers import CLIPTokenizer

from ..errors import BaseModelError
from .configs import ARCHS, SD_SCHEDULER, Arch
from .family import FAMILIES, Family
from .tokenizer import build_tokenizer, builtin_vocab_size

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
VAE_IN = "first_stage_model.decoder.conv_in.weight"

CLIP_VOCAB_SIZE = 49408  # both SD 1.x (OpenAI CLIP) and SD 2.x (OpenCLIP) use this vocabulary

Shapes = dict[str, tuple[int, ...]]


def _read_safetensors_header(path: Path) -> tuple[Shapes, dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            return shapes, dict(f.metadata() or {})
    except Exception as exc:  # SafetensorError: truncated, not safetensors at all, bad header
        raise BaseModelError(
            f"checkpoint '{path}' cannot be read as .safetensors ({exc}); the file is damaged or "
            "incomplete (an interrupted download or copy?). Download or export it again."
        ) from exc


def load_ckpt_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `.ckpt` state dict, read with `weights_only=True` so that a malicious pickle cannot run."""
    try:
        # mmap keeps a multi-GB zip checkpoint out of memory; the legacy format cannot be mapped.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:
        unsafe = "Weights only load failed" in str(exc)  # torch's refusal of a non-tensor pickle
        reason = ("it holds Python objects besides tensors, and dreamloom never runs code from a "
                  "checkpoint. Convert it to .safetensors with a tool you trust, or use a "
                  ".safetensors release of the model" if unsafe else
                  "the file is damaged or not a PyTorch checkpoint. Download or export it again")
        raise BaseModelError(f"cannot load checkpoint '{path}': {reason}.") from exc
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning-style checkpoints nest the weights
    if not isinstance(obj, dict):
        raise BaseModelError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a state dict "
                             "of named tensors; pass a Stable Diffusion .ckpt or .safetensors file.")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_header(path: Path) -> tuple[Shapes, dict[str, str]]:
    """Tensor shapes and metadata of a checkpoint, without reading a .safetensors file's weights."""
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors_header(path)
    return {k: tuple(v.shape) for k, v in load_ckpt_state_dict(path).items()}, {}


def file_family(path: Path, shapes: Shapes) -> Family:
    """The family whose text encoder layout the checkpoint has."""
    family = next((f for f in FAMILIES.values() if f.ldm_token_key in shapes), None)
    if family is None:
        raise BaseModelError(
            f"'{path}' is not a Stable Diffusion checkpoint: it has no text encoder weights "
            "(cond_stage_model.* or conditioner.embedders.*). Pass a full SD 1.x/2.x/SDXL model, not a LoRA, "
            "VAE or UNet-only file.")
    return family


def detect_arch(path: Path, shapes: Shapes) -> Arch:
    """Which built-in architecture the checkpoint has, from its text encoder's layout and width."""
    family = file_family(path, shapes)
    width = shapes[family.ldm_token_key][1]
    arch = next((a for a in ARCHS.values() if a.family == family.name and family.arch_text_width(a) == width), None)
    if arch is None:
        raise BaseModelError(f"checkpoint '{path}': a text encoder of width {width} matches no "
                             f"supported architecture ({', '.join(ARCHS)}).")
    if UNET_IN not in shapes or VAE_IN not in shapes:
        missing = "UNet (model.diffusion_model.*)" if UNET_IN not in shapes else "VAE (first_stage_model.*)"
        raise BaseModelError(f"checkpoint '{path}' has no {missing} weights; pass a full model file.")
    if shapes[UNET_IN][1] != arch.unet["in_channels"]:
        raise BaseModelError(
            f"checkpoint '{path}' has a UNet with {shapes[UNET_IN][1]} input channels (an inpainting "
            f"or other special model); dreamloom trains text-to-image bases with {arch.unet['in_channels']}."
        )
    return arch


def _yaml_parameterization(path: Path) -> str | None:
    """`model.params.parameterization` of a sibling `<name>.yaml` (A1111's convention), if any."""
    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file():
        return None
    try:
        config = yaml.safe_load(sidecar.read_text())
        return str(config["model"]["params"].get("parameterization", "eps"))
    except Exception as exc:
        raise BaseModelError(f"config '{sidecar}' next to the checkpoint is not a valid LDM yaml "
                             f"({type(exc).__name__}); fix it or move it away.") from exc


def prediction_type(path: Path, arch: Arch, shapes: Shapes, metadata: dict[str, str]) -> str:
    declared = metadata.get("modelspec.prediction_type", "")
    if declared in ("v", "v_prediction") or "v_pred" in shapes:
        return "v_prediction"
    if declared == "epsilon":
        return "epsilon"
    parameterization = _yaml_parameterization(path)
    if parameterization is not None:
        return "v_prediction" if parameterization == "v" else "epsilon"
    return arch.prediction_type  # as diffusers does: an unmarked SD 2 file is taken to be 768-v


def text_sizes(family: Family, shapes: Shapes) -> dict[str, tuple[int, int]]:
    """(vocabulary, positions) of each text encoder, from the file itself (added tokens count)."""
    return {part: (shapes[token][0], shapes.get(positions, (77,))[0])
            for part, (token, positions) in family.ldm_text_keys.items()}


def load_tokenizer(path: Path, arch: Arch, vocab_size: int, metadata: dict[str, str], which: int = 0) -> CLIPTokenizer:
    """The family's tokenizer number `which`: ours, or the real CLIP one from the user's HF cache."""
    if (metadata.get("dreamloom.tokenizer") == "builtin" or arch.version is not None
            or vocab_size == builtin_vocab_size()):
        return build_tokenizer()
    repo, subfolder = FAMILIES[arch.family].tokenizer_repos[which]
    try:
        kwargs = {"subfolder": subfolder} if subfolder else {}
        tokenizer = CLIPTokenizer.from_pretrained(repo, local_files_only=True, **kwargs)
        # transformers 5 returns an empty 2-token tokenizer, not an error, when nothing is cached.
        if len(tokenizer) < CLIP_VOCAB_SIZE:
            raise OSError(f"only {len(tokenizer)} tokens found")
        return tokenizer
    except Exception as exc:
        where = f"{repo} ({subfolder})" if subfolder else repo
        raise BaseModelError(
            f"checkpoint '{path}' comes from another tool and needs the real CLIP tokenizer "
            f"({where}), which is not in the local Hugging Face cache. Run once with network access "
            f"(e.g. `python -c \"from transformers import CLIPTokenizer; CLIPTokenizer.from_pretrained("
            f"'{repo}'{', subfolder=' + repr(subfolder) if subfolder else ''})\"`), or pass a "
            "diffusers model folder (it carries its tokenizer) instead of a single file."
        ) from exc


def file_tokenizers(path: Path) -> list[CLIPTokenizer]:
    """The tokenizers a checkpoint's text encoders need (from its header alone)."""
    shapes, metadata = read_header(path)
    arch = detect_arch(path, shapes)
    family = FAMILIES[arch.family]
    sizes = text_sizes(family, shapes)
    return [load_tokenizer(path, arch, sizes[part][0], metadata, i) for i, part in enumerate(family.text_encoders)]


def write_config_folder(folder: Path, arch: Arch, tokenizers: list[CLIPTokenizer], *,
                        sizes: dict[str, tuple[int, int]], prediction: str, zero_snr: bool = False) -> Path:
    """A diffusers model folder without weights (what `from_single_file(config=...)` reads), written
    from the architecture built on the meta device."""
    from .base import build_random

    # Sizes come from the file itself, so a model with added (e.g. embedding) tokens still loads.
    texts = {part: dict(getattr(arch, part), vocab_size=vocab, max_position_embeddings=positions)
             for part, (vocab, positions) in sizes.items()}
    base = build_random(dataclasses.replace(arch, **texts), meta=True, tokenizers=tokenizers)
    family = base.family
    index = {"_class_name": family.pipeline_class.__name__, "scheduler": ["diffusers", "DDIMScheduler"]}
    for name, module in base.modules().items():
        index[name] = [type(module).__module__.split(".")[0], type(module).__name__]
        if hasattr(module, "save_config"):  # diffusers models
            module.save_config(folder / name)
        else:  # transformers models
            module.config.save_pretrained(folder / name)
    for name, tokenizer in zip(family.tokenizers, tokenizers):
        index[name] = ["transformers", "CLIPTokenizer"]
        tokenizer.save_pretrained(folder / name)
    index.update({k: v if isinstance(v, bool) else [None, None] for k, v in family.pipeline_extras().items()})
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", **SD_SCHEDULER, "prediction_type": prediction,
         **({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if zero_snr else {})}, indent=1))
    return folder


def _check_complete(path: Path, pipe, family: Family) -> None:
    # diffusers leaves weights missing from the file on the meta device instead of failing.
    missing = [f"{part}.{name}" for part in family.parts
               for name, p in getattr(pipe, part).named_parameters() if p.is_meta]
    if missing:
        raise BaseModelError(f"checkpoint '{path}' lacks {len(missing)} weights of the model (e.g. "
                             f"{', '.join(missing[:3])}); it is incomplete or not an SD 1.x/2.x model.")


def load_single_file(path: Path):
    """A pipeline of the file's family from a `.safetensors` or `.ckpt` checkpoint, with no network access."""
    path = Path(path)
    shapes, metadata = read_header(path)
    arch = detect_arch(path, shapes)
    family = FAMILIES[arch.family]
    sizes = text_sizes(family, shapes)
    prediction = prediction_type(path, arch, shapes, metadata)
    tokenizers = [load_tokenizer(path, arch, sizes[part][0], metadata, i) for i, part in enumerate(family.text_encoders)]
    with tempfile.TemporaryDirectory(prefix="dreamloom-config-") as tmp:
        config = write_config_folder(Path(tmp), arch, tokenizers, sizes=sizes, prediction=prediction,
                                     zero_snr="ztsnr" in shapes)
        try:
            # A .ckpt is read again in there, also with weights_only=True (diffusers' loader).
            pipe = family.pipeline_class.from_single_file(str(path), config=str(config), local_files_only=True,
                                                          **family.pipeline_kwargs())
        except Exception as exc:
            detail = str(exc).splitlines()[0] if str(exc) else "no details"
            if "meta tensor" in detail:  # a weight missing from the file was left unloaded
                raise BaseModelError(f"checkpoint '{path}' lacks weights of the {arch.name} model; "
                                     "it is incomplete or of an unusual variant.") from exc
            raise BaseModelError(
                f"could not load checkpoint '{path}' as a {arch.name} model "
                f"({type(exc).__name__}: {detail}); the file may be damaged or of an unusual variant."
            ) from exc
    _check_complete(path, pipe, family)
    pipe.set_progress_bar_config(disable=True)
    return pipe
