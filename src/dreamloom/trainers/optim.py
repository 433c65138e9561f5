"""Optimizers and mixed precision, chosen by the recipe."""

from __future__ import annotations

import torch

from ..errors import RecipeError
from .method import ParamGroups


def make_optimizer(train, groups: ParamGroups) -> torch.optim.Optimizer:
    kwargs = dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                  weight_decay=train.weight_decay, eps=train.adam_epsilon)
    if train.optimizer == "adamw":  # foreach: one kernel per operation for all weights (torch picks it on GPUs only)
        return torch.optim.AdamW(groups, foreach=True, **kwargs)
    if train.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    if train.optimizer == "adafactor":  # transformers' Adafactor with a fixed rate, as kohya runs it
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=train.learning_rate, weight_decay=train.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False, beta1=None)
    if train.optimizer == "prodigy":
        from prodigyopt import Prodigy  # adapts the step size itself: learning_rate ~1.0

        return Prodigy(groups, **kwargs)
    raise RecipeError(f"unknown optimizer '{train.optimizer}'")


def check_precision(train) -> None:
    """Refuse, before any run exists, a precision this machine cannot compute in."""
    resolve_mixed_precision(train.mixed_precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """'auto' -> bf16 where the GPU has it, fp16 on other GPUs, full precision on the CPU."""
    if device.type != "cuda":
        if requested == "fp16":
            raise RecipeError("train.mixed_precision = 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on this machine.")
        return "no" if requested == "auto" else requested
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class StandardOptimizer:
    """An ordinary optimizer (as the accelerator prepared it) in the shape the loop drives:
    begin_step, clip, step, close. FusedOptimizer has the same shape and steps in backward hooks."""

    def __init__(self, optimizer, accelerator, params: list, max_grad_norm: float):
        self.optimizer, self.accelerator, self.params, self.max_grad_norm = optimizer, accelerator, params, max_grad_norm

    @property
    def schedulable(self):
        """What the LR schedule steers."""
        return self.optimizer

    def begin_step(self, step: int, last_micro: bool) -> None:
        pass

    def clip(self) -> None:
        if self.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        pass


def prepare_optimizer(train, groups: ParamGroups, accelerator, modules: list, params: list, sharded: bool = False):
    """(the trained parts as the accelerator prepared them, the optimizer the loop drives). Sharded parts are left
    as they are (a DDP wrapper would undo the sharding), and so is their optimizer: the accelerator would checkpoint
    the main process's shard of its state only; ShardedOptimizerState checkpoints it whole."""
    if sharded:
        from .sharding import ShardedOptimizerState

        optimizer = make_optimizer(train, groups)
        accelerator.register_for_checkpointing(ShardedOptimizerState(modules, optimizer))
        return modules, StandardOptimizer(optimizer, accelerator, params, train.max_grad_norm)
    if train.fused_backward:
        from .fused import FusedOptimizer

        optimizer = FusedOptimizer(train, groups, seed=train.seed)
        prepared = accelerator.prepare(*modules)
        accelerator.register_for_checkpointing(optimizer)
        return (list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]), optimizer
    *prepared, optimizer = accelerator.prepare(*modules, make_optimizer(train, groups))
    return prepared, StandardOptimizer(optimizer, accelerator, params, train.max_grad_norm)
