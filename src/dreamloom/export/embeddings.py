"""Textual-inversion embeddings: the files A1111/Forge, ComfyUI, InvokeAI and diffusers load, and a
reader for all of them (the sampler's side). See shared FORMATS.md.

- A1111 `.safetensors`: exactly one tensor, `emb_params` [n, dim]; any other tensor breaks A1111.
- A1111 `.pt`: a plain dict (`string_to_param`, `string_to_token`, `name`, `step`, ...) of tensors and
  primitives only, so it loads with `torch.load(weights_only=True)`.
- diffusers: `learned_embeds.safetensors` = {placeholder token: [n, dim]}.
- pivotal bundle: inside a kohya LoRA file, `bundle_emb.<trigger>.string_to_param.*` [n, dim].
Other UIs take the prompt word from the file name, so every embedding file is named after the trigger.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .. import __version__
from ..atomic import atomic_path
from ..errors import AdapterError
from .files import cast, refuse_overwrite, write_safetensors

A1111_KEY = "emb_params"
A1111_STAR_TOKEN = 265  # A1111 writes CLIP's id of "*" into every file; nothing reads it back
LEARNED_EMBEDS_FILE = "learned_embeds.safetensors"  # diffusers' name for an embedding file
BUNDLE_PREFIX = "bundle_emb."
BUNDLE_SUFFIX = ".string_to_param.*"

def _layout_keys() -> tuple[str, ...]:
    """Every key some family's embedding files use for one text encoder's set (SDXL: clip_l, clip_g)."""
    from ..models.family import FAMILIES

    return tuple(dict.fromkeys(k for f in FAMILIES.values() for k in (f.embedding_keys or {}).values()))


def embedding_info(run, base, recipe) -> dict:
    """What A1111's `.pt` records besides the vectors."""
    steps = run.checkpoint_steps()
    return {"name": recipe.data.trigger, "step": steps[-1] if steps else recipe.train.steps,
            "sd_checkpoint": None, "sd_checkpoint_name": recipe.base.model}


def _metadata(info: dict, base) -> dict[str, str]:
    return {"name": info["name"], "step": info["step"], "sd_checkpoint_name": info["sd_checkpoint_name"] or "",
            "dreamloom.version": __version__, "dreamloom.arch": base.arch.name}


def save_a1111_safetensors(path: Path, vectors: torch.Tensor, info: dict, base, dtype: str = "fp32",
                           overwrite: bool = False) -> Path:
    return write_safetensors(path, cast({A1111_KEY: vectors}, dtype), _metadata(info, base), overwrite=overwrite)


def save_a1111_pt(path: Path, vectors: torch.Tensor, info: dict, dtype: str = "fp32", overwrite: bool = False) -> Path:
    refuse_overwrite(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"string_to_token": {"*": A1111_STAR_TOKEN}, "string_to_param": cast({"*": vectors}, dtype),
            "name": info["name"], "step": int(info["step"]), "sd_checkpoint": info["sd_checkpoint"],
            "sd_checkpoint_name": info["sd_checkpoint_name"]}
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def save_diffusers_embedding(path: Path, token: str, vectors: torch.Tensor, info: dict, base, dtype: str = "fp32",
                             overwrite: bool = False) -> Path:
    return write_safetensors(path, cast({token: vectors}, dtype), _metadata(info, base), overwrite=overwrite)


SINGLE = "single"  # the layout key of a file that holds one set of vectors (SD 1.x / 2.x)


def file_tensors(base, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The embedding ({text-encoder part: vectors}) under the keys its family's files use: SD 1.x/2.x
    one tensor `emb_params`; SDXL `clip_l` and `clip_g`."""
    keys = base.family.embedding_keys
    if keys is None:
        (single,) = vectors.values()
        return {A1111_KEY: single}
    return {keys[part]: v for part, v in vectors.items()}


def bundle_tensors(base, trigger: str, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The embedding as A1111 (>= 1.7) and ComfyUI read it from inside a LoRA file."""
    keys = base.family.embedding_keys
    if keys is None:
        (single,) = vectors.values()
        return {f"{BUNDLE_PREFIX}{trigger}{BUNDLE_SUFFIX}": single}
    return {f"{BUNDLE_PREFIX}{trigger}.{keys[part]}": v for part, v in vectors.items()}


def split_bundle(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(LoRA tensors, {trigger: layout}) of a LoRA file that may carry bundled embeddings; a layout is
    {"single": vectors} or {"clip_l": ..., "clip_g": ...}."""
    lora, embeddings = {}, {}
    for key, tensor in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            name, _, rest = key.removeprefix(BUNDLE_PREFIX).partition(".")
            embeddings.setdefault(name, {})[rest if rest in _layout_keys() else SINGLE] = tensor
        else:
            lora[key] = tensor
    return lora, embeddings


def export_embedding(paths: dict[str, Path], run, base, recipe, vectors: dict[str, torch.Tensor],
                     overwrite: bool = False) -> list[Path]:
    """Write the embedding ({text-encoder part: vectors}) in each format of `paths` ({format: path})
    that is an embedding format: a1111, a1111_pt (SD 1.x/2.x only), diffusers."""
    trigger, dtype, info = recipe.data.trigger, recipe.export.dtype, embedding_info(run, base, recipe)
    tensors = file_tensors(base, vectors)
    single = tensors.get(A1111_KEY)
    writers = {"a1111": lambda path: write_safetensors(path, cast(tensors, dtype), _metadata(info, base), overwrite),
               "a1111_pt": lambda path: save_a1111_pt(path, single, info, dtype, overwrite),
               # diffusers: {token: vectors} for one text encoder; SDXL's files are the same clip_l / clip_g file
               "diffusers": lambda path: (save_diffusers_embedding(path, trigger, single, info, base, dtype, overwrite)
                                          if single is not None else write_safetensors(
                                              path, cast(tensors, dtype), _metadata(info, base), overwrite))}
    return [writers[f](path) for f, path in paths.items() if f in writers]


def _vectors_of(data, path: Path) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(token the file names itself, layout) from a loaded embedding file of any known layout."""
    if isinstance(data, dict) and "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError("its string_to_param does not hold exactly one tensor")
        name = data.get("name")
        return (name if isinstance(name, str) else None), {SINGLE: next(iter(params.values()))}
    if isinstance(data, dict) and (keys := [k for k in _layout_keys() if k in data]):  # one set per text encoder
        return None, {k: data[k] for k in keys}
    if isinstance(data, dict) and len(data) == 1:  # A1111/kohya `emb_params`, or diffusers {token: T}
        key, tensor = next(iter(data.items()))
        return (None if key == A1111_KEY else key), {SINGLE: tensor}
    raise ValueError(f"expected one tensor (emb_params or a token) or an A1111 dict; found keys "
                     f"{list(data)[:5] if isinstance(data, dict) else type(data).__name__}")


def _metadata_name(path: Path) -> str | None:
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("name") or None


def read_embedding_file(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(prompt word, layout: {"single": [n, dim]} or {"clip_l": ..., "clip_g": ...}) of an embedding
    file. The word is the file name, as in A1111 and ComfyUI, except for diffusers' fixed file name
    `learned_embeds.*`, whose token is stored inside (or, for SDXL's two sets, in the file's metadata)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / LEARNED_EMBEDS_FILE
    if not path.is_file():
        raise AdapterError(f"embedding file '{path}' does not exist.")
    try:
        if path.suffix == ".safetensors":
            data = load_file(path)
        else:  # .pt / .bin: never run code from a pickle
            data = torch.load(path, map_location="cpu", weights_only=True)
        token, layout = _vectors_of(data, path)
    except AdapterError:
        raise
    except Exception as exc:
        raise AdapterError(
            f"'{path}' cannot be read as a textual-inversion embedding ({type(exc).__name__}: {exc}). dreamloom "
            "reads A1111 .safetensors (emb_params) and .pt files and diffusers learned_embeds files.") from exc
    if not all(isinstance(v, torch.Tensor) and v.dim() in (1, 2) for v in layout.values()):
        raise AdapterError(f"embedding '{path}' holds no [vectors, width] tensor.")
    if path.stem == "learned_embeds" and token is None and path.suffix == ".safetensors":
        token = _metadata_name(path)  # SDXL's clip_l / clip_g file under diffusers' name: ours records the word
    word = token if path.stem == "learned_embeds" and token else path.stem
    return word, {k: v.reshape(-1, v.shape[-1]).float() for k, v in layout.items()}
