"""Sharded data parallel for full fine-tunes (train.strategy): each of N processes keeps 1/N of the trained weights,
of their gradients and of the optimizer state, and gathers one block's weights at a time for its forward and backward.

This is PyTorch's FSDP2 (`fully_shard`), the engine Accelerate's FSDP plugin applies on GPUs. It is applied here
directly because Accelerate runs processes without GPUs as plain DDP (its FSDP needs a GPU distributed type), and one
code path must run on the GPUs and be tested on the CPU over gloo. The loop sees whole weights only through
`Sharding.gathered` (checkpoints, samples, validation, exports: on the main process) and `Sharding.load` (resume).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

# train.strategy -> fully_shard's reshard_after_forward: full_shard frees each block's gathered weights after its
# forward (ZeRO-3), shard_grad_op keeps them until its backward (ZeRO-2: more memory, one all-gather fewer).
RESHARD_AFTER_FORWARD = {"full_shard": True, "shard_grad_op": False}


def units(module: nn.Module) -> list[nn.Module]:
    """What is gathered at once: each item of the module's ModuleLists at any depth (a UNet's blocks, their ResNets
    and attention layers, a transformer's layers), inner items first: an item holding ModuleLists is gathered for the
    weights its own items leave (a block's down- or upsampler). What no item holds (embeddings, the ends of a UNet) is
    one more unit, the root, gathered throughout the forward pass."""
    found = []
    for child in module.children():
        for item in child if isinstance(child, nn.ModuleList) else [child]:
            found += units(item)
            if isinstance(child, nn.ModuleList):
                found.append(item)
    return found


def largest_unit_numel(module: nn.Module) -> int:
    """Trained parameters of the largest unit (each counted in the innermost unit holding it): what one gather brings."""
    owner = {}
    for i, unit in enumerate(units(module)):  # inner units come first: the first to claim a parameter owns it
        for p in unit.parameters():
            owner.setdefault(id(p), i)
    sizes = {}
    for p in module.parameters():
        if p.requires_grad:
            sizes[owner.get(id(p), -1)] = sizes.get(owner.get(id(p), -1), 0) + p.numel()
    return max(sizes.values(), default=0)


def local(p: torch.Tensor) -> torch.Tensor:
    """This process's share of a parameter (the whole of an unsharded one)."""
    return p.to_local() if hasattr(p, "to_local") else p


def _skeleton(module: nn.Module) -> nn.Module:
    """A copy of the module whose parameters are on the meta device (no memory): the shape whole weights are loaded into."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


class Sharding:
    """The trained parts of a base, sharded across the processes, and the way back to whole weights."""

    def __init__(self, base, parts: tuple[str, ...], strategy: str, main: bool, compute_dtype: torch.dtype):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.parts, self.main = parts, main
        self.skeletons = {name: _skeleton(getattr(base, name)) for name in parts}
        self.device = next(getattr(base, parts[0]).parameters()).device
        self.names = {id(p): f"{part}.{n}" for part in parts for n, p in getattr(base, part).named_parameters()}
        # Under mixed precision the weights are gathered in the compute dtype (half the bytes of a gather, and no
        # autocast copy of every weight held to the end of the forward pass); gradients are averaged in fp32.
        options = dict(reshard_after_forward=RESHARD_AFTER_FORWARD[strategy], mp_policy=MixedPrecisionPolicy(
            param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype != torch.float32 else MixedPrecisionPolicy())
        for name in parts:
            module = getattr(base, name)
            for unit in units(module):
                fully_shard(unit, **options)
            fully_shard(module, **options)

    def regroup(self, groups: list[dict], base) -> list[dict]:
        """The optimizer's parameter groups on the sharded parameters (sharding replaces each parameter object)."""
        after = {f"{part}.{n}": p for part in self.parts for n, p in getattr(base, part).named_parameters()}
        return [{**g, "params": [after[self.names[id(p)]] for p in g["params"]]} for g in groups]

    def _whole(self, base, name: str, everywhere: bool) -> nn.Module | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        module = getattr(base, name)
        # Every process takes part in the gather; with cpu_offload only the main process receives the weights.
        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))
        if not (everywhere or self.main):
            return None
        whole = copy.deepcopy(self.skeletons[name])
        whole.load_state_dict(state, assign=True)
        return whole.to(self.device)

    @contextmanager
    def gathered(self, base):
        """Collective: every process enters. The base with whole trained parts (ordinary modules) on the main
        process, None on the others."""
        wholes = {name: self._whole(base, name, everywhere=False) for name in self.parts}
        yield base.with_modules(**wholes) if self.main else None

    def load(self, base, load) -> None:
        """Collective: `load(whole_base)` reads a checkpoint into whole parts, which every process then takes its shard of."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        whole = base.with_modules(**{name: self._whole(base, name, everywhere=True) for name in self.parts})
        load(whole)
        for name in self.parts:
            set_model_state_dict(getattr(base, name), getattr(whole, name).state_dict(),
                                 options=StateDictOptions(full_state_dict=True))


class Unsharded:
    """The same two doors for weights that every process holds whole (one process, or DDP)."""

    def __init__(self, main: bool):
        self.main = main

    @contextmanager
    def gathered(self, base):
        from .parts import unwrapped

        yield unwrapped(base) if self.main else None

    def load(self, base, load) -> None:
        from .parts import unwrapped

        load(unwrapped(base))


class ShardedOptimizerState:
    """The optimizer state of sharded parameters in a checkpoint: gathered whole (every process takes part; the
    accelerator writes the main process's copy) and split again on load, so a resumed run on as many processes
    continues bit for bit."""

    def __init__(self, modules: list[nn.Module], optimizer):
        self.model, self.optimizer = nn.ModuleList(modules), optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))
