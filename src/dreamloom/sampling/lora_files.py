"""Reading LoRA files for the sampler: which layout, and does it fit this base?

kohya-layout files (LoRA, LoCon, LoHa, LoKr, DoRA) are checked module by module when they are
patched in (kohya_patch.py); diffusers/PEFT files are checked here, before diffusers sees them,
because a LoRA made for another architecture otherwise loads partly or fails deep inside peft
with a message about tensor shapes.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from ..errors import AdapterError
from ..export.lora import LORA_WEIGHTS_FILE
from ..models.family import FAMILIES

BUNDLE = "bundle_emb."  # a pivotal file's embedding rides along


def resolve_lora_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / LORA_WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(f"LoRA file '{path}' does not exist.")
    if path.suffix != ".safetensors":
        raise AdapterError(f"LoRA file '{path}' is not a .safetensors file; dreamloom reads LoRAs only in safetensors.")
    return path


def read_lora(path: Path, base=None) -> tuple[str, dict[str, tuple[int, ...]], dict[str, str]]:
    """(layout, key -> shape, metadata). Layout is 'kohya' or 'diffusers', as any family names its parts."""
    try:
        with safe_open(path, "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as exc:
        raise AdapterError(f"LoRA file '{path}' cannot be read as safetensors: {exc}") from exc
    keys = [k for k in shapes if not k.startswith(BUNDLE)]
    # Any family's names: a file made for another family is then told apart by its layers, and refused by name.
    families = list(FAMILIES.values())
    kohya = tuple(p for f in families for p in (*f.kohya_prefixes.values(), *f.kohya_aliases))
    parts = {p for f in families for p in ("unet", *f.text_encoders)}
    if keys and all(k.startswith(kohya) for k in keys):
        return "kohya", shapes, metadata
    if keys and all(k.split(".", 1)[0] in parts and ".lora_" in k for k in keys):
        return "diffusers", shapes, metadata
    raise AdapterError(
        f"'{path}' is not a LoRA in a layout dreamloom reads for this base (kohya `{'`, `'.join(kohya)}...` or "
        f"diffusers `unet....lora_A.weight`); first keys: {keys[:3]}."
    )


def _expected_shapes(base) -> dict[str, tuple[int, int]]:
    """diffusers key prefix of each layer (`unet.down_blocks...to_q`) -> (in_features, out_features)."""
    family, out = base.family, {}
    for part in ("unet", *family.text_encoders):
        for name, module in family.adaptable_layers(base, part).items():
            out[f"{part}.{family.canonical(part, name)}"] = (module.weight.shape[1], module.weight.shape[0])
    return out


def check_diffusers_lora_fits(path: Path, base, shapes: dict, metadata: dict) -> None:
    """Raise AdapterError naming the file when its layers do not match the base."""
    expected, problems = _expected_shapes(base), []
    for key, shape in shapes.items():
        down, up = key.endswith("lora_A.weight"), key.endswith("lora_B.weight")
        if not (down or up):
            continue
        module = key.rsplit(".", 2)[0]
        if module not in expected:
            problems.append(f"{module}: no such layer in this base")
        elif down and shape[1] != expected[module][0]:
            problems.append(f"{module}: input width {shape[1]}, the base has {expected[module][0]}")
        elif up and shape[0] != expected[module][1]:
            problems.append(f"{module}: output width {shape[0]}, the base has {expected[module][1]}")
    if problems:
        raise not_fitting(path, base, metadata, problems)


def made_for(metadata: dict[str, str]) -> str:
    """What a file says it was made for, with its family: `tiny-xl (SDXL)`, `sd_v1 (SD 1.x)`, or `unknown`."""
    from ..models import ARCHS

    name = metadata.get("dreamloom.arch") or metadata.get("ss_base_model_version") or metadata.get(
        "modelspec.architecture", "").split("/")[0]
    arch = ARCHS.get(name)
    family = FAMILIES[arch.family] if arch else next(
        (f for f in FAMILIES.values() if name and (name == f.kohya_version or name.startswith(f.modelspec)
                                                    or name.startswith(f.kohya_version))), None)
    return f"{name} ({family.title})" if family and name else name or "unknown"


def not_fitting(path: Path, base, metadata: dict[str, str], problems: list[str]) -> AdapterError:
    return AdapterError(
        f"LoRA '{path}' was made for {made_for(metadata)} and does not fit base '{base.spec}' ({base.family.title}, "
        f"architecture {base.arch.name}): {len(problems)} layer(s) differ, e.g.\n  " + "\n  ".join(problems[:5])
        + "\nPass the base model this LoRA was trained on with --base.")
