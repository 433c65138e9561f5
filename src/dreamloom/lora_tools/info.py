"""`dreamloom lora info`: what an adapter file is, read from its keys, shapes and metadata alone
(no base is loaded): format, family, rank, alpha, layers, trigger words, which UIs load it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from safetensors import safe_open

from ..errors import AdapterError
from ..export.embeddings import BUNDLE_PREFIX
from ..sampling.lora_files import read_lora
from .files import family_of

KOHYA_UIS = "A1111/Forge, ComfyUI, InvokeAI, diffusers, dreamloom"
LYCORIS_UIS = "A1111 >= 1.5/Forge, ComfyUI, dreamloom (not diffusers' load_lora_weights)"  # LoHa, LoKr, DoRA
# LyCORIS's key suffixes -> the adapter type they make (checked in this order)
TYPES = [("dora_scale", "DoRA"), ("hada_w1_a", "LoHa"), ("lokr_w1", "LoKr"), ("lokr_w1_a", "LoKr"),
         ("lora_down.weight", "LoRA")]


def lora_info(path: Path) -> dict:
    layout, shapes, metadata = read_lora(path)
    keys = [k for k in shapes if not k.startswith(BUNDLE_PREFIX)]
    modules: dict[str, set[str]] = {}
    for key in keys:
        if layout == "kohya":
            name, _, suffix = key.partition(".")
        else:  # unet.down_blocks...to_q.lora_A.weight
            name, suffix, _ = key.rsplit(".", 2)
        modules.setdefault(name, set()).add(suffix)
    kinds = Counter(next((t for s, t in TYPES if s in suf), "other") for suf in modules.values()) \
        if layout == "kohya" else Counter({"LoRA": len(modules)})
    ranks = Counter(shapes[k][0] for k in keys if k.endswith(("lora_down.weight", "lora_A.weight")))
    convs = sum(1 for k in keys if k.endswith("lora_down.weight") and len(shapes[k]) == 4)
    if "LoRA" in kinds and convs:
        kinds["LoCon (conv layers)"] = convs
    trigger = metadata.get("modelspec.trigger_phrase", "")
    try:
        tags = Counter({t: n for folder in json.loads(metadata.get("ss_tag_frequency", "{}")).values()
                        for t, n in folder.items()})
    except (ValueError, AttributeError):
        tags = Counter()
    if layout != "kohya":
        loads_in = "diffusers, dreamloom (ComfyUI only partly, A1111 not)"
    else:
        loads_in = KOHYA_UIS if set(kinds) <= {"LoRA", "LoCon (conv layers)"} else LYCORIS_UIS
    return {
        "file": str(path), "kind": "lora", "format": f"{layout} layout",
        "types": dict(kinds), "made_for": family_of(metadata, keys),
        "layers": len(modules), "ranks": dict(sorted(ranks.items())),
        "network_dim": metadata.get("ss_network_dim", ""), "network_alpha": metadata.get("ss_network_alpha", ""),
        "trigger": trigger, "top_tags": [t for t, _ in tags.most_common(5)],
        "bundled_embeddings": sorted({k.split(".")[1] for k in shapes if k.startswith(BUNDLE_PREFIX)}),
        "loads_in": loads_in,
        "metadata": metadata,
    }


def embedding_info(path: Path, tensors: dict) -> dict:
    from ..sampling.embeddings import layout_family, made_for as width_family

    word = path.stem
    if set(tensors) <= {"emb_params"} or len(tensors) == 1:
        (vectors,) = tensors.values()
        family = width_family(vectors.shape[-1])
    else:
        vectors, family = next(iter(tensors.values())), layout_family(tensors)
    return {"file": str(path), "kind": "embedding", "format": "textual-inversion embedding",
            "made_for": family, "vectors": int(vectors.shape[0]), "keys": sorted(tensors),
            "trigger": word, "loads_in": "A1111/Forge, ComfyUI (embedding:NAME), diffusers, dreamloom"}


def hypernetwork_info(path: Path) -> dict:
    from ..export.hypernetwork import load_hypernetwork_file

    fields, layers = load_hypernetwork_file(path)
    return {"file": str(path), "kind": "hypernetwork", "format": f"A1111 hypernetwork ({path.suffix})",
            "widths": sorted(layers), "layer_structure": fields.get("layer_structure"),
            "activation": fields.get("activation_func"), "made_for": fields.get("sd_checkpoint_name") or "unknown",
            "loads_in": "A1111/Forge, ComfyUI, dreamloom" if path.suffix == ".pt" else "dreamloom only (ComfyUI reads .pt)"}


def describe(spec: str) -> dict:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise AdapterError(f"'{path}' does not exist; pass an adapter file (.safetensors or .pt).")
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, "pt") as f:
                keys = list(f.keys())
                if all(k.split(".", 1)[0].isdigit() for k in keys) and keys:
                    return hypernetwork_info(path)
                if len(keys) <= 2 and keys and all(k in ("emb_params", "clip_l", "clip_g") or "." not in k for k in keys):
                    return embedding_info(path, {k: f.get_tensor(k) for k in keys})
        except AdapterError:
            raise
        except Exception as exc:
            raise AdapterError(f"'{path}' cannot be read as safetensors: {exc}") from exc
        return lora_info(path)
    if path.suffix in (".pt", ".bin"):
        import torch

        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterError(f"'{path}' cannot be read safely ({type(exc).__name__}); dreamloom reads only "
                               ".pt files that hold tensors and plain values.") from exc
        if isinstance(data, dict) and any(isinstance(k, int) for k in data):
            return hypernetwork_info(path)
        if isinstance(data, dict) and "string_to_param" in data:
            return embedding_info(path, dict(data["string_to_param"]))
        if isinstance(data, dict) and data and all(hasattr(v, "shape") for v in data.values()):
            return embedding_info(path, data)
    raise AdapterError(f"'{path}' is no LoRA, LyCORIS, embedding or hypernetwork file dreamloom knows "
                       "(.safetensors or A1111 .pt).")


def text(info: dict) -> str:
    """Plain lines for a person."""
    skip = {"metadata", "file"}
    lines = [f"{info['file']}"] + [f"  {k.replace('_', ' ')}: {v}" for k, v in info.items()
                                    if k not in skip and v not in ("", [], {}, None)]
    meta = info.get("metadata") or {}
    if meta:
        lines.append("  metadata:")
        lines += [f"    {k} = {v if len(v) < 120 else v[:117] + '...'}" for k, v in sorted(meta.items())]
    return "\n".join(lines)
