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
    text_encoder_2: dict | None = field(default=None, repr=False)  # SDXL's second (OpenCLIP-G, with projection)
    hub_ids: tuple[str, ...] = ()  # published repos of exactly this architecture: estimated without a download


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

_CLIP_L = dict(  # CLIP ViT-L/14 text tower (SD 1.x, and SDXL's first text encoder)
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)

SD15 = Arch(
    name="sd15",
    family="sd1",
    hub_ids=("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5",
             "CompVis/stable-diffusion-v1-4"),
    resolution=512,
    prediction_type="epsilon",
    unet=dict(_SD_UNET, cross_attention_dim=768, attention_head_dim=8),
    vae=_SD_VAE,
    text_encoder=_CLIP_L,
)

SD21 = Arch(
    name="sd21",
    family="sd2",
    hub_ids=("stabilityai/stable-diffusion-2-1",),
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

SDXL = Arch(  # stabilityai/stable-diffusion-xl-base-1.0; Pony, Illustrious, NoobAI, ... share it
    name="sdxl",
    family="sdxl",
    hub_ids=("stabilityai/stable-diffusion-xl-base-1.0",),
    resolution=1024,
    prediction_type="epsilon",
    unet=dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,  # CLIP-L's 768 and OpenCLIP-G's 1280, concatenated
        use_linear_projection=True,
        addition_embed_type="text_time",  # pooled text + size/crop "time ids"
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 1280 pooled + 6 x 256
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
        upcast_attention=False,
    ),
    vae=dict(_SD_VAE, sample_size=1024, force_upcast=True),  # overflows in fp16: diffusers upcasts it
    vae_scaling_factor=0.13025,
    text_encoder=_CLIP_L,
    text_encoder_2=dict(  # OpenCLIP ViT-bigG/14 text tower; its projection gives the pooled embedding
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=1280,
    ),
)

TINY_XL = Arch(  # the SDXL architecture scaled down: two text encoders, text_time embedding, deeper
    name="tiny-xl",  # transformers at the lower resolution, 8x VAE; random weights, for the tests
    family="sdxl",
    version="tiny-xl",
    resolution=64,
    prediction_type="epsilon",
    unet=dict(
        TINY.unet,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # SDXL: no attention at the top level
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=80,  # 32 + 48: the two text encoders side by side
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=96,  # 48 pooled + 6 x 8
    ),
    vae=dict(TINY.vae, force_upcast=True),
    vae_scaling_factor=0.13025,
    text_encoder=dict(TINY.text_encoder),
    # another width than the first, as in SDXL: loaders (diffusers' from_single_file) tell them apart by it
    text_encoder_2=dict(TINY.text_encoder, hidden_size=48, intermediate_size=96, hidden_act="gelu", projection_dim=48),
)

ARCHS = {a.name: a for a in (TINY, TOY, SD15, SD21, TINY_XL, SDXL)}
# The test bases: built from their configs with seeded random weights, named by themselves (not random:<name>)
TINY_BASES = ("tiny", "tiny-xl")


def arch_for_unet(config: dict) -> Arch | None:
    """Recognise a model's architecture from its UNet config (a loaded model's, or a folder's
    unet/config.json): by the cross-attention width and the extra embedding (SDXL's text_time)."""
    width, extra = config.get("cross_attention_dim"), config.get("addition_embed_type")
    return next((a for a in ARCHS.values() if a.unet["cross_attention_dim"] == width
                 and a.unet.get("addition_embed_type") == extra), None)
