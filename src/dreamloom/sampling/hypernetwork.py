"""The sampler's side of hypernetworks: load A1111 `.pt` or dreamloom `.safetensors` files and
apply them, one after another as A1111 does, each at its own strength."""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterError
from ..export.hypernetwork import load_hypernetwork_file
from ..models.hypernetwork import (
    WEIGHT_INITS, Hypernetwork, HypernetworkConfig, a1111_activations, attach_hypernetwork, context_widths,
    default_dropout_structure,
)


def config_from_fields(fields: dict, path: Path) -> HypernetworkConfig:
    """The network a file describes, with A1111's defaults for fields an older file lacks."""
    ls = fields.get("layer_structure") or [1, 2, 1]
    activation = fields.get("activation_func") or "linear"  # A1111 treats a missing one as linear
    if activation not in a1111_activations():
        raise AdapterError(f"hypernetwork '{path}' uses activation '{activation}', which neither A1111 nor "
                           "dreamloom knows.")
    init = fields.get("weight_initialization")
    use_dropout = bool(fields.get("use_dropout", False))
    dropout = fields.get("dropout_structure") or default_dropout_structure(
        ls, use_dropout, bool(fields.get("last_layer_dropout", False)))
    return HypernetworkConfig(
        layer_structure=tuple(float(x) for x in ls), activation_func=activation,
        is_layer_norm=bool(fields.get("is_layer_norm", False)),
        weight_initialization=init if init in WEIGHT_INITS else "Normal",  # the file's weights replace it
        use_dropout=use_dropout or any(dropout), dropout_structure=tuple(float(p) for p in dropout),
        last_layer_dropout=dropout[-2] != 0, activate_output=bool(fields.get("activate_output", True)))


def load_hypernetwork(path: str | Path, base) -> Hypernetwork:
    """The network in a file, checked to have MLPs for every context width the base reads."""
    path = Path(path).expanduser()
    fields, layers = load_hypernetwork_file(path)
    needed = context_widths(base.unet)
    missing = [w for w in needed if w not in layers]
    if missing:
        raise AdapterError(
            f"hypernetwork '{path}' has context widths {sorted(layers)}, but base '{base.spec}' needs {needed} "
            f"(missing {missing}): it was made for another architecture. Pass the base model it was trained "
            "on with --base.")
    config = config_from_fields(fields, path)
    try:
        network = Hypernetwork(config, list(layers))
        for width, states in layers.items():
            for mlp, state in zip(network[str(width)], states):
                mlp.load_state_dict(state)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise AdapterError(f"hypernetwork '{path}': its layers do not match its own settings (layer_structure, "
                           f"activation_func, is_layer_norm, dropout_structure): {exc}") from exc
    return network.eval().requires_grad_(False)


def attach_hypernetworks(pipe, base, specs: list[tuple[str | Path, float]]) -> None:
    """Apply each hypernetwork file at its strength to the pipeline's UNet; strength 0 is the base."""
    networks = [(load_hypernetwork(path, base), strength) for path, strength in specs]  # all checked first
    for network, strength in networks:
        network.to(pipe.unet.device)
        attach_hypernetwork(pipe.unet, network, strength)
