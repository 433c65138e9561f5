"""kohya-layout adapter files (LoRA, LoCon, LoHa, LoKr, DoRA; ours or any other tool's) applied to a
base the way A1111 and ComfyUI apply them: each patched layer's weight becomes W + s * dW, and for
a weight-decomposed (DoRA) layer W + s * (W' - W), so strength 0 is the base exactly.

The per-layer math is LyCORIS's own (its module classes, the reference implementation those UIs
follow); which layer a key names comes from the base's family (`kohya_modules`), so the original
UNet layout kohya's SDXL trainer writes is read as well as the diffusers one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch



def adapter_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{kohya module name: {its keys' suffixes: tensors}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = tensor
    return modules


def build(path: Path, base, tensors: dict[str, torch.Tensor]) -> list[tuple[torch.nn.Module, object]]:
    """(layer, LyCORIS module holding the file's weights for it) for every module of the file; an
    AdapterError naming the file lists every module that does not fit the base."""
    from lycoris.modules import get_module, make_module

    table, problems, built = base.family.kohya_modules(base), [], []
    for name, params in adapter_modules(tensors).items():
        if name not in table:
            problems.append(f"{name}: no such layer in this base")
            continue
        part, module_name = table[name]
        layer = getattr(base, part).get_submodule(module_name)
        kind, weights = get_module(tensors, name)
        if kind is None:
            problems.append(f"{name}: keys {sorted(params)} are no adapter type LyCORIS knows")
            continue
        lyco = None
        try:
            lyco = make_module(kind, weights, name, layer)
            mismatch = [k for k, v in lyco.state_dict().items() if k in params and tuple(v.shape) != tuple(params[k].shape)]
        except (RuntimeError, ValueError, IndexError) as exc:
            mismatch = [str(exc).splitlines()[0]]
        if lyco is None or mismatch:
            problems.append(f"{name}: its weights {sorted((k, tuple(v.shape)) for k, v in params.items())[:3]} do not "
                            f"fit the layer's {tuple(layer.weight.shape)}")
            continue
        built.append((layer, lyco))
    if problems:
        from safetensors import safe_open

        from .lora_files import not_fitting

        with safe_open(path, "pt") as f:
            raise not_fitting(path, base, f.metadata() or {}, problems)
    return built


@torch.no_grad()
def apply(built: list[tuple[torch.nn.Module, object]], strength: float) -> Callable[[], None]:
    """Patch the layers with their adapters (from `build`) at `strength`; returns what undoes it."""
    originals = []
    for layer, lyco in built:
        weight = layer.weight
        diff = delta(lyco, weight)
        originals.append((layer, weight.detach().to("cpu", copy=True)))
        weight.copy_((weight.float() + strength * diff).to(weight.dtype))

    def restore() -> None:
        with torch.no_grad():
            for layer, original in originals:
                layer.weight.copy_(original.to(layer.weight.device))
    return restore


def delta(lyco, weight: torch.Tensor) -> torch.Tensor:
    """dW at strength 1 in fp32, as the module's own forward computes it (LyCORIS 4.1's get_diff_weight
    applies alpha/rank twice for LoHa and LoKr; its forward, ComfyUI and A1111 apply it once); for DoRA
    the whole re-normalised weight minus the base's, so that strength s interpolates as those UIs do."""
    from lycoris.modules.locon import LoConModule

    lyco = lyco.float().to(weight.device)
    if isinstance(lyco, LoConModule):
        diff = lyco.make_weight(weight.device).view(weight.shape) * lyco.scale
    else:
        diff = lyco.get_weight(tuple(weight.shape)) * lyco.scalar
    if getattr(lyco, "wd", False):
        return (lyco.apply_weight_decompose(weight.float() + diff, 1) - weight.float()).float()
    return diff.float()
