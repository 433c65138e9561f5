"""Built-in architectures: the exact configs of the real models, and `tiny`, the same SD 1.x
architecture scaled down so that it builds in well under a second for tests and the demo.

An architecture is configs (numbers); how a family of architectures behaves (text encoders, the
UNet call, file layouts) is its Family's (models/family.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SD_SCHEDULER = dict(  # the training schedule every SD 1.x / 2.x model was trained with
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


@dataclass(frozen=True)
class Arch:
    name: str
    family: str  # key of its Family in models/family.py FAMILIES
    resolution: int  # native training resolution in pixels
    prediction_type: str  # "epsilon" | "v_prediction"
    unet: dict = field(repr=False)
    vae: dict = field(repr=False)
    text_encoder: dict = field(repr=False)
    vae_scaling_factor: float = 0.18215
    version: str | None = None  # what exports call a base of ours that is no public model (tiny, toy)


_SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
)

_SD_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
)

SD15 = Arch(
    name="sd15",
    family="sd1",
    resolution=512,
    prediction_type="epsilon",
    unet=dict(_SD_UNET, cross_attention_dim=768, attention_head_dim=8),
    vae=_SD_VAE,
    text_encoder=dict(  # CLIP ViT-L/14 text tower
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
    ),
)

SD21 = Arch(
    name="sd21",
    family="sd2",
    resolution=768,
    prediction_type="v_prediction",
    unet=dict(
        _SD_UNET,
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    ),
    vae=dict(_SD_VAE, sample_size=768),
    text_encoder=dict(  # OpenCLIP ViT-H/14 text tower, penultimate layer (23 of 24 kept)
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=512,
    ),
)

TINY = Arch(
    name="tiny",
    family="sd1",
    version="tiny",
    resolution=64,
    prediction_type="epsilon",
    unet=dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ),
    vae=dict(  # four blocks: the real 8x downsampling, so 64 px images give 8x8 latents
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    ),
    text_encoder=dict(
        vocab_size=None,  # filled in with the built-in tokenizer's size
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=32,
    ),
)

TOY = Arch(  # the toy world's base (dreamloom.toy): SD 1.x at 64 px, pretrained weights ship as package data
    name="toy",
    family="sd1",
    version="toy",
    resolution=64,
    prediction_type="epsilon",
    unet=dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    vae=dict(  # 8x down to 4x8x8 latents, like SD's
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        # One group: a GroupNorm removes each group's mean and scale over the whole picture, and at
        # this width 4 groups took the colour with them (judge on round-tripped pictures: 83% -> 99.6%).
        norm_num_groups=1,
        sample_size=64,
    ),
    text_encoder=dict(
        vocab_size=None,  # the built-in tokenizer, in which every toy-world word is one token
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=64,
    ),
)

ARCHS = {a.name: a for a in (TINY, TOY, SD15, SD21)}


def arch_for_unet(config: dict) -> Arch | None:
    """Recognise a model's architecture from its UNet config (a loaded model's, or a folder's
    unet/config.json): by the cross-attention width."""
    width = config.get("cross_attention_dim")
    return next((a for a in ARCHS.values() if a.unet["cross_attention_dim"] == width), None)
