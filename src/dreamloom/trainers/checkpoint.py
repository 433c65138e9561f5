"""Checkpoints through `accelerator.save_state`, holding only what the method trains.

The accelerator's pre-hooks swap the full model weights (gigabytes for a LoRA run) for the
method's own state dict; optimizer, LR schedule and RNG states are saved as usual. A checkpoint
is written to a hidden temp folder and renamed into place, so a kill mid-write leaves the
previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

TRAINABLE = "trainable.safetensors"
EMA = "ema.safetensors"  # the EMA weights, under the same names as TRAINABLE
PROGRESS = "progress.json"


def _method_state(method, base) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in method.state_dict(base).items()}


def register_hooks(accelerator, method, base, sharding, ema=None) -> None:
    """Every process runs the hooks (gathering sharded weights is collective); the main one writes."""
    def save_hook(models, weights, output_dir):
        with sharding.gathered(base) as whole:
            if whole is not None:
                save_file(_method_state(method, whole), os.path.join(output_dir, TRAINABLE))
        if ema is not None:
            with ema.applied(), sharding.gathered(base) as whole:
                if whole is not None:
                    save_file(_method_state(method, whole), os.path.join(output_dir, EMA), metadata={"steps": str(ema.steps)})
        weights.clear()  # the method's state above replaces the full model weights

    def load_hook(models, input_dir):
        if ema is not None:  # EMA weights through the model into the average, then the live ones
            path = os.path.join(input_dir, EMA)
            sharding.load(base, lambda whole: method.load_state_dict(whole, load_file(path)))
            with safe_open(path, "pt") as f:
                ema.reset_from_params(int(f.metadata()["steps"]))
        sharding.load(base, lambda whole: method.load_state_dict(whole, load_file(os.path.join(input_dir, TRAINABLE))))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, run, step: int, keep: int) -> Path:
    final = run.checkpoint_dir(step)
    tmp = run.checkpoints / f".tmp-{final.name}"
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / PROGRESS).write_text(json.dumps({"step": step}))
        os.replace(tmp, final)
        run.prune_checkpoints(keep)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> int:
    """Restore model, optimizer, schedule; return the number of steps already done."""
    accelerator.load_state(str(path))
    return json.loads((path / PROGRESS).read_text())["step"]


def load_trainable(path: Path, prefer_ema: bool = True) -> dict:
    """The weights to export from a checkpoint: the EMA ones where the run kept an EMA."""
    ema = path / EMA
    return load_file(ema if prefer_ema and ema.exists() else path / TRAINABLE)
