"""`dreamloom lora extract`: a LoRA from a full fine-tune (DreamBooth) and its base, by SVD of each
adapted layer's weight difference, so that a multi-GB model becomes a small file.

Only the layers a LoRA adapts are compared (the family's kohya names): Linear and 1x1 conv layers,
and with `conv=True` the 3x3 convs too (LoCon layout: lora_down holds the kernel)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import AdapterError
from ..export.files import refuse_overwrite
from ..models import load_base
from .files import write_lora
from .lowrank import Pair, factor

UNCHANGED = 1e-6  # |dW| / |W| below this is rounding, not training: the layer is left out


def layer_differences(tuned, base, conv: bool) -> dict[str, torch.Tensor]:
    """{kohya module name: tuned weight - base weight} for the layers that changed."""
    if tuned.arch.name != base.arch.name and tuned.family.title != base.family.title:
        raise AdapterError(f"The fine-tuned model is {tuned.family.title} and the base is {base.family.title}; "
                           "pass the base the model was fine-tuned from with --base.")
    family, out = base.family, {}
    layers = dict.fromkeys(base.family.kohya_modules(base).values())  # each (part, module) once
    for part, module in layers:
        name = family.kohya_name(base, part, module)  # the names our exporter writes (SDXL: original layout)
        before = getattr(base, part).get_submodule(module).weight
        try:
            after = getattr(tuned, part).get_submodule(module).weight
        except AttributeError:
            raise AdapterError(f"The fine-tuned model has no layer {part}.{module}; pass its own base with --base.")
        if before.shape != after.shape:
            raise AdapterError(f"Layer {part}.{module} is {tuple(after.shape)} in the fine-tuned model and "
                               f"{tuple(before.shape)} in the base; pass the base it was fine-tuned from with --base.")
        if before.dim() == 4 and before.shape[-1] > 1 and not conv:
            continue
        diff = after.detach().float() - before.detach().float()
        if diff.norm() > UNCHANGED * before.detach().float().norm():
            out[name] = diff
    return out


def extract(model: str, base_spec: str, out: Path, *, rank: int | None, energy: float | None, conv: bool,
            dtype: str, overwrite: bool, report=print) -> Path:
    refuse_overwrite(out, overwrite)
    tuned, base = load_base(model), load_base(base_spec)
    pairs: dict[str, tuple[Pair, float]] = {}
    for name, diff in layer_differences(tuned, base, conv).items():
        pair = factor(diff, rank=rank, energy=energy)
        pairs[name] = (pair, float(pair.rank))  # alpha = rank: scale 1, up @ down is the difference
        report(f"{name}: rank {pair.rank}, relative error {pair.error:.2e}")
    extra = {"dreamloom.extracted_from": json.dumps({"model": str(model), "base": base_spec, "rank": rank,
                                                     "energy": energy, "conv": conv})}
    return write_lora(out, base, pairs, dtype, extra, overwrite)
