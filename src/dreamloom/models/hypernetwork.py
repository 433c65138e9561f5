"""AUTOMATIC1111's hypernetwork, built the way A1111 builds it, and attached to a diffusers UNet.

Per context width, two small MLPs shift the context that attention's to_k and to_v read:
k = to_k(ctx + MLP_k(ctx) * s), v = to_v(ctx + MLP_v(ctx) * s); the query is untouched and
self-attention uses its own input as the context (shared FORMATS.md, "Hypernetwork"). The layer
order inside each MLP's `nn.Sequential` is the file format: `linear.{i}` counts every layer.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

# The activations ComfyUI's loader accepts (A1111 accepts these too). "swish" is Hardswish in both.
PORTABLE_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softsign": nn.Softsign, "mish": nn.Mish,
}

WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")  # A1111's names


def a1111_activations() -> dict[str, type[nn.Module]]:
    """Every name A1111 accepts: its own seven, plus each class of torch.nn.modules.activation
    under its lower-cased name (so "gelu", "silu": files ComfyUI refuses to load)."""
    module = torch.nn.modules.activation
    found = {name.lower(): cls for name, cls in inspect.getmembers(module, inspect.isclass)
             if cls.__module__ == module.__name__}
    return {**found, **PORTABLE_ACTIVATIONS}


def default_dropout_structure(layer_structure, use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's parse_dropout_structure: 0.3 after every hidden layer but the last, which gets it
    only with last_layer_dropout; never on the input or the output."""
    n = len(layer_structure)
    if not use_dropout:
        return [0.0] * n
    return [0.0] + [0.3] * (n - 3) + [0.3 if last_layer_dropout else 0.0] + [0.0]


@dataclass(frozen=True)
class HypernetworkConfig:
    """The settings that shape the network, under the names A1111 writes into its files."""

    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation_func: str = "linear"
    is_layer_norm: bool = False
    weight_initialization: str = "Normal"
    use_dropout: bool = False
    dropout_structure: tuple[float, ...] = (0.0, 0.0, 0.0)
    last_layer_dropout: bool = False
    activate_output: bool = False

    def fields(self) -> dict:
        """The file fields, as lists and primitives (what A1111's torch.save holds)."""
        return {"layer_structure": list(self.layer_structure), "activation_func": self.activation_func,
                "is_layer_norm": self.is_layer_norm, "weight_initialization": self.weight_initialization,
                "activate_output": self.activate_output, "use_dropout": self.use_dropout,
                "dropout_structure": list(self.dropout_structure), "last_layer_dropout": self.last_layer_dropout}


class HypernetworkMLP(nn.Module):
    """A1111's HypernetworkModule: x + linear(x) * strength, with `linear` laid out as A1111 does."""

    def __init__(self, dim: int, config: HypernetworkConfig):
        super().__init__()
        ls, layers = config.layer_structure, []
        for i in range(len(ls) - 1):
            layers.append(nn.Linear(int(dim * ls[i]), int(dim * ls[i + 1])))
            last = i == len(ls) - 2
            if config.activation_func != "linear" and (not last or config.activate_output):
                layers.append(a1111_activations()[config.activation_func]())
            if config.is_layer_norm:
                layers.append(nn.LayerNorm(int(dim * ls[i + 1])))
            if config.dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(p=config.dropout_structure[i + 1]))
        self.linear = nn.Sequential(*layers)
        self._init_weights(config)

    @torch.no_grad()
    def _init_weights(self, config: HypernetworkConfig) -> None:
        # As A1111: LayerNorm (like "Normal") gets weight ~ N(0, 0.01), not ones; biases start at 0.
        relu = "leaky_relu" if config.activation_func == "leakyrelu" else "relu"
        init = {
            "Normal": lambda w: nn.init.normal_(w, mean=0.0, std=0.01),
            "XavierUniform": nn.init.xavier_uniform_,
            "XavierNormal": nn.init.xavier_normal_,
            "KaimingUniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity=relu),
            "KaimingNormal": lambda w: nn.init.kaiming_normal_(w, nonlinearity=relu),
        }
        for layer in self.linear:
            if isinstance(layer, nn.LayerNorm):
                init["Normal"](layer.weight)
            elif isinstance(layer, nn.Linear):
                init[config.weight_initialization](layer.weight)
            else:
                continue
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, strength: float) -> torch.Tensor:
        return x + self.linear(x) * strength


class Hypernetwork(nn.ModuleDict):
    """Width -> [MLP for k, MLP for v]. Its state_dict keys are the flat file layout,
    e.g. `768.0.linear.0.weight` (width 768, k) and `768.1.linear.0.weight` (v)."""

    def __init__(self, config: HypernetworkConfig, widths: list[int]):
        super().__init__({str(w): nn.ModuleList([HypernetworkMLP(w, config), HypernetworkMLP(w, config)])
                          for w in widths})
        self.config = config

    def shift(self, context: torch.Tensor, which: int, strength: float) -> torch.Tensor:
        """The context for to_k (which=0) or to_v (which=1); contexts of a width this network
        has no MLPs for pass unchanged, as in A1111. Computed in the network's own precision."""
        pair = self._modules.get(str(context.shape[-1]))
        if pair is None:
            return context
        dtype = next(pair.parameters()).dtype
        return pair[which](context.to(dtype), strength).to(context.dtype)


def context_widths(unet) -> list[int]:
    """The context widths the UNet's attentions read: the text width first (cross-attention),
    then the self-attention widths, ascending. SD 1.x: [768, 320, 640, 1280], A1111's order."""
    cross = unet.config.cross_attention_dim
    widths = {m.to_k.in_features for m in unet.modules() if isinstance(m, Attention)}
    return [cross] + sorted(widths - {cross})


class _ShiftedKeyValue:
    """Stands in for an Attention module inside the processor it wraps: every attribute is the
    module's own, except to_k and to_v, which first pass their input through the hypernetworks.
    So the attention math stays exactly diffusers' own, and the query never sees a hypernetwork."""

    def __init__(self, attn: Attention, processor: "HypernetworkAttnProcessor"):
        self._attn = attn
        self.to_k = lambda context: attn.to_k(processor.shift(context, 0))
        self.to_v = lambda context: attn.to_v(processor.shift(context, 1))

    def __getattr__(self, name: str):
        return getattr(self._attn, name)


class HypernetworkAttnProcessor(nn.Module):
    """Wraps an attention's processor (SDPA's AttnProcessor2_0 by default). The hypernetworks are
    submodules, so they move with the UNet and the loop trains them as part of it; several are
    applied one after another, each at its own strength (A1111's apply_hypernetworks)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.networks = nn.ModuleList()
        self.strengths: list[float] = []

    def shift(self, context: torch.Tensor, which: int) -> torch.Tensor:
        for network, strength in zip(self.networks, self.strengths):
            context = network.shift(context, which, strength)
        return context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        return self.inner(_ShiftedKeyValue(attn, self), hidden_states, encoder_hidden_states,
                          attention_mask, temb, *args, **kwargs)


def attach_hypernetwork(unet, network: Hypernetwork, strength: float) -> None:
    """Apply `network` in every attention of the UNet (after any hypernetwork already there).
    No base weight changes; self- and cross-attention are both patched, as A1111 and ComfyUI do."""
    for module in unet.modules():
        if isinstance(module, Attention):
            if not isinstance(module.processor, HypernetworkAttnProcessor):
                module.set_processor(HypernetworkAttnProcessor(module.processor))
            module.processor.networks.append(network)
            module.processor.strengths.append(strength)
