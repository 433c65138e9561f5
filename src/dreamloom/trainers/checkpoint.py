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

from safetensors.torch import load_file, save_file

TRAINABLE = "trainable.safetensors"
PROGRESS = "progress.json"


def register_hooks(accelerator, method, base) -> None:
    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            state = {k: v.detach().cpu().contiguous() for k, v in method.state_dict(base).items()}
            save_file(state, os.path.join(output_dir, TRAINABLE))
        weights.clear()  # the method's state above replaces the full model weights

    def load_hook(models, input_dir):
        method.load_state_dict(base, load_file(os.path.join(input_dir, TRAINABLE)))
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


def load_trainable(path: Path) -> dict:
    return load_file(path / TRAINABLE)
