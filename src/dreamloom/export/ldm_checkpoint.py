"""Full model as one file in the original LDM checkpoint layout (what A1111, Forge and ComfyUI load).

The renames follow the original `openaimodel.UNetModel` / `ldm` autoencoder / text-encoder module
trees, as documented by diffusers' `convert_diffusers_to_original_stable_diffusion.py` (writer) and
`single_file_utils.py` (reader). The block arithmetic is derived from the config, not hard-coded for
SD 1.5, so `tiny` (2 UNet blocks, 1 layer per block) converts the same way. Only renames, reshapes
and concatenations are used, so a base built on the meta device converts too (for layout checks).
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..atomic import atomic_write
from ..models.tokenizer import builtin_vocab_size
from .files import cast, refuse_overwrite, write_safetensors

UNET, VAE = "model.diffusion_model.", "first_stage_model."

# ResBlock parameter names: diffusers -> original (UNet and VAE differ only in the shortcut name).
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# OpenCLIP resblock names for the parts of a CLIP encoder layer (q/k/v are fused separately).
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                    "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


def _unet_prefixes(config) -> dict[str, tuple[str, bool]]:
    """diffusers module prefix -> (original prefix, is a ResBlock), from the block structure.

    The original UNet is flat: input block 0 is conv_in, then each down block contributes
    `layers` (ResBlock [+ SpatialTransformer]) entries and, except the last, one downsampler; each
    up block contributes `layers + 1` entries, its upsampler sitting in the last one after the
    attention (slot 2) or straight after the ResBlock (slot 1).
    """
    layers = config.layers_per_block
    if not isinstance(layers, int):
        raise ValueError(f"per-block layer counts {layers!r} have no original-layout equivalent")
    n = len(config.block_out_channels)
    down_attn = ["CrossAttn" in t for t in config.down_block_types]
    up_attn = ["CrossAttn" in t for t in config.up_block_types]
    p = {"conv_in.": ("input_blocks.0.0.", False), "time_embedding.linear_1.": ("time_embed.0.", False),
         "time_embedding.linear_2.": ("time_embed.2.", False), "conv_norm_out.": ("out.0.", False),
         "conv_out.": ("out.2.", False), "mid_block.resnets.0.": ("middle_block.0.", True),
         "mid_block.attentions.0.": ("middle_block.1.", False),
         "mid_block.resnets.1.": ("middle_block.2.", True),
         # SDXL: the pooled text + size embedding (diffusers' add_embedding) is the original's label_emb
         "add_embedding.linear_1.": ("label_emb.0.0.", False), "add_embedding.linear_2.": ("label_emb.0.2.", False)}
    for i in range(n):
        for j in range(layers):
            idx = 1 + i * (layers + 1) + j
            p[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{idx}.0.", True)
            if down_attn[i]:
                p[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{idx}.1.", False)
        p[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(i + 1) * (layers + 1)}.0.op.", False)
        for j in range(layers + 1):
            idx = i * (layers + 1) + j
            p[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{idx}.0.", True)
            if up_attn[i]:
                p[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{idx}.1.", False)
        last, slot = i * (layers + 1) + layers, 2 if up_attn[i] else 1
        p[f"up_blocks.{i}.upsamplers.0.conv."] = (f"output_blocks.{last}.{slot}.conv.", False)
    return p


def _split_prefix(key: str, prefixes: dict) -> tuple[str, str]:
    """The longest registered prefix of `key` (module prefixes are at most five parts deep)."""
    parts = key.split(".")
    for k in range(min(5, len(parts) - 1), 0, -1):
        prefix = ".".join(parts[:k]) + "."
        if prefix in prefixes:
            return prefix, key[len(prefix):]
    raise ValueError(f"UNet parameter '{key}' has no place in the original layout")


def _rename(rest: str, table: dict[str, str]) -> str:
    """Rename the leading module of `rest` by `table` (diffusers name -> original name)."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _ldm_unet_key(key: str, prefixes: dict) -> str:
    prefix, rest = _split_prefix(key, prefixes)
    ldm_prefix, is_resnet = prefixes[prefix]
    return ldm_prefix + (_rename(rest, _UNET_RESNET) if is_resnet else rest)


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(unet.config)
    return {UNET + _ldm_unet_key(key, prefixes): tensor for key, tensor in unet.state_dict().items()}


def unet_ldm_module_names(unet, names: list[str]) -> dict[str, str]:
    """diffusers module name -> its name in the original layout (`down_blocks.1.attentions.0.proj_in`
    -> `input_blocks.4.1.proj_in`): what kohya's SDXL trainer writes into LoRA keys."""
    prefixes = _unet_prefixes(unet.config)
    return {name: _ldm_unet_key(f"{name}.weight", prefixes).removesuffix(".weight") for name in names}


def _vae_key(key: str, n_blocks: int) -> str:
    parts = key.split(".")
    coder = parts[0]  # encoder | decoder | quant_conv | post_quant_conv
    if parts[1:2] == ["conv_norm_out"]:
        return f"{coder}.norm_out.{parts[-1]}"
    if parts[1:2] in (["down_blocks"], ["up_blocks"]):
        i = int(parts[2])
        # The original decoder numbers its levels from the lowest resolution up: reversed.
        level = f"down.{i}" if parts[1] == "down_blocks" else f"up.{n_blocks - 1 - i}"
        if parts[3] == "resnets":
            return f"{coder}.{level}.block.{parts[4]}." + _rename(".".join(parts[5:]), _VAE_RESNET)
        sampler = "downsample" if parts[3] == "downsamplers" else "upsample"
        return f"{coder}.{level}.{sampler}." + ".".join(parts[5:])
    if parts[1:3] == ["mid_block", "resnets"]:
        return f"{coder}.mid.block_{int(parts[3]) + 1}." + _rename(".".join(parts[4:]), _VAE_RESNET)
    if parts[1:3] == ["mid_block", "attentions"]:
        return f"{coder}.mid.attn_1." + _rename(".".join(parts[4:]), _VAE_ATTN)
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    n_blocks = len(vae.config.block_out_channels)
    out = {}
    for key, tensor in vae.state_dict().items():
        new = _vae_key(key, n_blocks)
        if ".mid.attn_1." in new and new.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # the original attention uses 1x1 convs
        out[VAE + new] = tensor
    return out


def _text_state(text_encoder) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); accept both.
    return {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()
            if not k.endswith("position_ids")}


def clip_to_ldm(text_encoder, prefix: str = "cond_stage_model.transformer.text_model.") -> dict[str, torch.Tensor]:
    """SD 1.x (and SDXL's CLIP-L): the transformers CLIP module tree is kept as is, under `prefix`."""
    return {prefix + k: v for k, v in _text_state(text_encoder).items() if not k.startswith("text_projection")}


def open_clip_to_ldm(text_encoder, prefix: str = "cond_stage_model.model.",
                     projection: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """SD 2.x / SDXL's OpenCLIP-G: OpenCLIP names, q/k/v fused into one `in_proj` as torch's
    MultiheadAttention has it. `projection`: the text projection in OpenCLIP's orientation ([width,
    proj], SDXL's pooled embedding); without one an identity stands in (SD 2 never applies it)."""
    state = {k: v for k, v in _text_state(text_encoder).items() if not k.startswith("text_projection")}
    out = {prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": state.pop("final_layer_norm.bias")}
    for layer in range(text_encoder.config.num_hidden_layers):
        src, dst = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
        for key in [k for k in state if k.startswith(src)]:
            out[dst + _rename(key[len(src):], _OPEN_CLIP_LAYER)] = state.pop(key)
    if state:
        raise ValueError(f"text encoder parameters with no OpenCLIP name: {sorted(state)[:5]}")
    if projection is None:
        # SD 2 conditions on the penultimate layer, so OpenCLIP's final projection is never applied;
        # loaders still expect it ([width, width]; diffusers reads q/k/v split sizes from its rows).
        ref = out[prefix + "ln_final.weight"]
        projection = torch.eye(text_encoder.config.hidden_size, dtype=ref.dtype, device=ref.device)
    out[prefix + "text_projection"] = projection.contiguous() if projection.device.type != "meta" else projection
    return out


def to_ldm_state_dict(base) -> dict[str, torch.Tensor]:
    """UNet + VAE + text encoders of a Base, under their original single-file checkpoint names."""
    return {**unet_to_ldm(base.unet), **vae_to_ldm(base.vae), **base.family.text_to_ldm(base)}


def uses_builtin_tokenizer(base) -> bool:
    return len(base.tokenizer) == builtin_vocab_size()


def v2_inference_yaml(base) -> dict:
    """The v-prediction inference config A1111/Forge pick up from `<name>.yaml` (v2-inference-v.yaml)."""
    unet, vae = base.unet.config, base.vae.config
    return {"model": {
        "base_learning_rate": 1.0e-4,
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "parameterization": "v",
            "linear_start": base.scheduler_config.get("beta_start", 0.00085),
            "linear_end": base.scheduler_config.get("beta_end", 0.012),
            "num_timesteps_cond": 1, "log_every_t": 200,
            "timesteps": base.scheduler_config.get("num_train_timesteps", 1000),
            "first_stage_key": "jpg", "cond_stage_key": "txt",
            "image_size": base.arch.resolution // 8, "channels": unet.in_channels,
            "cond_stage_trainable": False, "conditioning_key": "crossattn",
            "monitor": "val/loss_simple_ema", "scale_factor": vae.scaling_factor, "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
                "use_checkpoint": True, "use_fp16": True, "image_size": 32,
                "in_channels": unet.in_channels, "out_channels": unet.out_channels,
                "model_channels": unet.block_out_channels[0],
                "attention_resolutions": sorted((2 ** i for i, t in enumerate(unet.down_block_types)
                                                 if "CrossAttn" in t), reverse=True),
                "num_res_blocks": unet.layers_per_block,
                "channel_mult": [c // unet.block_out_channels[0] for c in unet.block_out_channels],
                "num_head_channels": 64, "use_spatial_transformer": True,
                "use_linear_in_transformer": bool(unet.use_linear_projection),
                "transformer_depth": 1, "context_dim": unet.cross_attention_dim, "legacy": False}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": vae.latent_channels, "monitor": "val/rec_loss",
                "ddconfig": {"double_z": True, "z_channels": vae.latent_channels, "resolution": 256,
                             "in_channels": vae.in_channels, "out_ch": vae.out_channels,
                             "ch": vae.block_out_channels[0],
                             "ch_mult": [c // vae.block_out_channels[0] for c in vae.block_out_channels],
                             "num_res_blocks": vae.layers_per_block, "attn_resolutions": [],
                             "dropout": 0.0},
                "lossconfig": {"target": "torch.nn.Identity"}}},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                  "params": {"freeze": True, "layer": "penultimate"}},
        }}}


def save_single_file(base, path: Path, *, dtype: str = "fp16", metadata: dict[str, str] | None = None,
                     overwrite: bool = False) -> Path:
    """Write the base as one `.safetensors` checkpoint (plus `<name>.yaml` for an SD 2 v-model)."""
    path = Path(path)
    v_pred = base.prediction_type == "v_prediction"
    yaml_path = path.with_suffix(".yaml") if v_pred and base.family.needs_v_yaml else None
    refuse_overwrite(path, overwrite)  # check both files before writing either
    if yaml_path is not None:
        refuse_overwrite(yaml_path, overwrite)

    tensors = to_ldm_state_dict(base)
    if v_pred:
        tensors["v_pred"] = torch.zeros(0)  # ComfyUI's marker: the key's presence is what counts
    if base.scheduler_config.get("rescale_betas_zero_snr"):
        tensors["ztsnr"] = torch.zeros(0)  # ComfyUI's marker of a zero-terminal-SNR schedule
    res = base.arch.resolution
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.title": path.stem,
            "modelspec.resolution": f"{res}x{res}", **(metadata or {}),
            "modelspec.architecture": base.family.modelspec_architecture(base.arch),
            "modelspec.prediction_type": "v" if v_pred else "epsilon",
            "dreamloom.arch": base.arch.name}
    if uses_builtin_tokenizer(base):
        meta["dreamloom.tokenizer"] = "builtin"  # the reader must not look for the CLIP vocabulary
    write_safetensors(path, cast(tensors, dtype), meta, overwrite=overwrite)
    if yaml_path is not None:
        atomic_write(yaml_path, yaml.safe_dump(v2_inference_yaml(base), sort_keys=False))
    return path
