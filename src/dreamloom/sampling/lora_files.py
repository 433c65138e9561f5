"""Reading LoRA files for the sampler: which format, and does it fit this base?

Checked before diffusers sees the file, because a LoRA made for another architecture otherwise
loads partly or fails deep inside peft with a message about tensor shapes.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from ..errors import AdapterError
from ..export.lora import DIFFUSERS_FILE, KOHYA_PREFIX, canonical

LDM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")


def resolve_lora_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / DIFFUSERS_FILE
    if not path.is_file():
        raise AdapterError(f"LoRA file '{path}' does not exist.")
    if path.suffix != ".safetensors":
        raise AdapterError(f"LoRA file '{path}' is not a .safetensors file; dreamloom reads LoRAs only in safetensors.")
    return path


def read_lora(path: Path) -> tuple[str, dict[str, tuple[int, ...]], dict[str, str]]:
    """(format, key -> shape, metadata). Format is 'kohya' or 'diffusers'."""
    try:
        with safe_open(path, "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as exc:
        raise AdapterError(f"LoRA file '{path}' cannot be read as safetensors: {exc}") from exc
    keys = [k for k in shapes if not k.startswith("bundle_emb.")]  # a pivotal file's embedding rides along
    if keys and all(k.startswith(tuple(KOHYA_PREFIX.values()) + ("lora_te1_", "lora_te2_")) for k in keys):
        return "kohya", shapes, metadata
    if keys and all(k.startswith(("unet.", "text_encoder.")) and ".lora_" in k for k in keys):
        return "diffusers", shapes, metadata
    raise AdapterError(
        f"'{path}' is not a LoRA in a format dreamloom reads (kohya `lora_unet_...` or "
        f"diffusers `unet....lora_A.weight`); first keys: {keys[:3]}."
    )


def _expected_shapes(base, fmt: str) -> dict[str, tuple[int, int]]:
    """Module name as the file would spell it -> (in_features, out_features)."""
    out = {}
    for part in ("unet", "text_encoder"):
        for name, module in getattr(base, part).named_modules():
            weight = getattr(module, "weight", None)
            if weight is None or weight.dim() not in (2, 4) or ".lora_" in name or "base_layer" in name:
                continue
            name = canonical(part, name)
            key = KOHYA_PREFIX[part] + name.replace(".", "_") if fmt == "kohya" else f"{part}.{name}"
            out[key] = (weight.shape[1], weight.shape[0])
    return out


def check_lora_fits(path: Path, base) -> str:
    """Raise AdapterError naming the file when its layers do not match the base; return the format."""
    fmt, shapes, metadata = read_lora(path)
    expected = _expected_shapes(base, fmt)
    problems = []
    for key, shape in shapes.items():
        if fmt == "kohya" and any(b in key for b in LDM_BLOCKS):
            continue  # original-layout names: diffusers maps them itself; widths still checked below
        down = key.endswith(("lora_down.weight", "lora_A.weight"))
        up = key.endswith(("lora_up.weight", "lora_B.weight"))
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
        made_for = metadata.get("dreamloom.arch") or metadata.get("ss_base_model_version") or "unknown"
        raise AdapterError(
            f"LoRA '{path}' does not fit base '{base.spec}' (architecture {base.arch.name}); it was made "
            f"for: {made_for}. {len(problems)} layer(s) differ, e.g.\n  " + "\n  ".join(problems[:5])
            + "\nPass the base model this LoRA was trained on with --base."
        )
    return fmt
