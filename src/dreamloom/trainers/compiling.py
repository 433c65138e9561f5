"""train.compile = "blocks": regional compilation (PyTorch's recipe; diffusers' `compile_repeated_blocks`). Each of
the UNet's repeated blocks is compiled in place rather than the UNet whole: blocks of one kind share their compiled
code (their weights are its inputs), so compiling costs a few graphs instead of one graph of the whole network, and
the weights keep their names (checkpoints and exports are those of an uncompiled run)."""

from __future__ import annotations

import shutil

from torch import nn

from ..errors import RecipeError

# diffusers lists the UNet's transformer blocks as its repeated ones (`_repeated_blocks`); its ResNets repeat as often
# and cost as much at small sizes.
RESNET_BLOCKS = ("ResnetBlock2D",)


def repeated_blocks(unet: nn.Module) -> list[nn.Module]:
    names = {*getattr(unet, "_repeated_blocks", ()), *RESNET_BLOCKS}
    return [m for m in unet.modules() if type(m).__name__ in names]


def check_compiler(train) -> None:
    """torch.compile builds its kernels with the machine's C++ compiler (and Triton its launchers with a C one): a
    recipe that compiles is refused before any run exists where none is installed."""
    if train.compile != "off" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise RecipeError(f"train.compile = '{train.compile}' needs a C++ compiler (g++ or clang++) to build the "
                          "compiled kernels, and none is installed; install one, or set train.compile = 'off'")


# Blocks of one kind differ in sizes and in whether their input needs a gradient (before or after the first trained
# layer): each such variant is one more graph. torch's default of 8 per function would leave the rest eager.
RECOMPILE_LIMIT = 64


def compile_blocks(unet: nn.Module) -> int:
    """Compile each repeated block in place; returns how many."""
    import torch._dynamo.config

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    blocks = repeated_blocks(unet)
    for block in blocks:
        block.compile()
    return len(blocks)
