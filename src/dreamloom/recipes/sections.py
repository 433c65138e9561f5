"""The recipe sections every method shares ([base], [data], [train], [prior], [sample], [export]),
and `Section`, the base of every section, methods' own included.

Every section forbids unknown keys, so a typo is an error that names the key, never a setting
that silently does nothing.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..captions import spelled_out


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseSection(Section):
    model: str = Field("tiny", description="toy | tiny | tiny-xl | random:sd15 | random:sd21 | random:sdxl | "
                       "diffusers folder | .safetensors file | hub id")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="auto: what the base says (a v_pred key, its scheduler config); v_prediction for "
        "v-pred community bases whose file does not say so")
    zero_terminal_snr: bool = Field(False, description="rescale the noise schedule to zero terminal SNR (needs "
                                    "v-prediction; NoobAI-style v-pred bases were trained so)")


class FolderSection(Section):
    """One more folder of pictures ([[data.folders]]), with its own repeats and captions."""

    path: str = Field(min_length=1, description="folder of images (+ .txt captions)")
    repeats: int = Field(1, ge=1, le=1000, description="how often each picture is seen per epoch")
    class_word: str | None = Field(None, description="this folder's class (default: data.class_word)")
    caption_template: str | None = Field(None, description="captions of pictures without a .txt (default: "
                                         "data.caption_template, or prior.class_prompt for regularization)")
    caption_prefix: str | None = Field(None, description="put before every caption of this folder, e.g. "
                                       "'{trigger}, ' (default: data.caption_prefix; '' for none)")
    caption_suffix: str | None = None
    regularization: bool = Field(False, description="class pictures (prior preservation) instead of the subject: "
                                 "captioned prior.class_prompt where they have no .txt, never data.caption_prefix; "
                                 "paired one per subject picture, so their repeats do not apply")


class DataSection(Section):
    path: str = Field("", description="folder of images (+ .txt captions), a datasets imagefolder, or a folder "
                      "of kohya-style '<repeats>_<caption>' sub-folders")
    trigger: str = Field("sks", min_length=1, description="the new word that names the subject or style")
    class_word: str = Field("", description="what the subject is (dog, person, style)")
    caption_template: str = "a photo of {trigger} {class_word}"
    caption_prefix: str = Field("", description="put before every caption, e.g. '{trigger}, ' for tag captions")
    caption_suffix: str = ""
    folders: list[FolderSection] = Field(default_factory=list, description="more folders, each with its own "
                                         "repeats, captions and class ([[data.folders]])")
    resolution: int = Field(512, ge=32, le=2048, multiple_of=8)
    resolutions: list[Annotated[int, Field(ge=32, le=2048, multiple_of=8)]] = Field(default_factory=list, description="more resolutions for the same run "
                                   "(e.g. [768] beside resolution 512): every picture trains at each")
    buckets: bool = Field(False, description="aspect-ratio bucketing: pictures keep their shape (equal-area "
                          "buckets) instead of being centre-cropped to a square")
    bucket_step: int = Field(64, ge=8, le=256, multiple_of=8, description="bucket sides are multiples of this")
    bucket_max_aspect: float = Field(2.5, ge=1, le=8, description="the widest (and tallest) bucket's side ratio")
    bucket_max_upscale: float = Field(2.0, ge=1, description="a picture is never enlarged more than this; a smaller "
                                      "one gets a smaller bucket of its own")
    crop: Literal["center", "random"] = "center"
    flip: bool = Field(False, description="random horizontal flips (off for subjects with text/asymmetry)")
    hue_jitter: float = Field(0.0, ge=0, le=1, description=(
        "turn each training picture's colours round the colour wheel at random, up to hue_jitter x 180 degrees "
        "either way (kohya's color_aug, OneTrainer's random hue; grays stay gray): colour variety, so that the "
        "subject's colour is learnt less as part of it; 1: any hue. It does not make a prompt's colour word "
        "recolour the subject (measured on the toy base: QUALITY.md). Off for subjects whose colour is who they "
        "are (a brand character, a product). Latents are then encoded at every step, not cached"))
    repeats: int = Field(1, ge=1, le=1000)
    min_image_size: int = Field(64, ge=1, description="images smaller than this (shorter side, px) are refused")
    cache_latents: bool = Field(True, description="encode each image once; the VAE leaves memory while training")
    caption_dropout: float = Field(0.0, ge=0, lt=1, description="share of examples trained with an empty caption "
                                   "(what classifier-free guidance needs when pretraining)")
    shuffle_tags: bool = Field(False, description="shuffle a caption's comma-separated tags at every step")
    keep_tokens: int = Field(0, ge=0, description="the first N tags stay in place under shuffling and dropout "
                             "(the trigger, say)")
    keep_tokens_separator: str = Field("", description="tags before it stay in place (and after a second one, at "
                                       "the end), e.g. '|||'")
    tag_dropout: float = Field(0.0, ge=0, lt=1, description="each tag (but the kept ones) left out this often")
    tag_separator: str = Field(",", min_length=1, description="what separates tags in a caption")
    masked_loss: bool = Field(False, description="weight the loss by a mask per picture: its alpha channel, or "
                              "<name>.mask.png beside it (white = learn, black = ignore)")
    unmasked_weight: float = Field(0.0, ge=0, le=1, description="loss weight of what the mask hides")
    validation_split: float = Field(0.0, ge=0, lt=1, description="share of the pictures held out to measure a "
                                    "validation loss at every checkpoint")
    validation_path: str = Field("", description="folder of held-out pictures for the validation loss")

    @property
    def all_resolutions(self) -> list[int]:
        return list(dict.fromkeys([self.resolution, *self.resolutions]))

    @property
    def varied_captions(self) -> bool:
        """Whether a caption changes from step to step (so text cannot be encoded once)."""
        return self.shuffle_tags or self.tag_dropout > 0


class TrainSection(Section):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(1, ge=1, description="pictures per step in each process (the global batch is "
                            "batch_size x processes)")
    processes: int = Field(1, ge=1, description="processes of one run (one per GPU, data parallel through "
                           "`accelerate launch`; on a machine without GPUs, CPU processes over gloo)")
    strategy: Literal["ddp", "shard_grad_op", "full_shard"] = Field(
        "ddp", description="how several processes hold a full fine-tune: ddp, each the whole model; shard_grad_op "
        "(ZeRO-2), each 1/N of the gradients and optimizer state; full_shard (ZeRO-3), also 1/N of the weights, "
        "gathered one block at a time (the least memory per GPU, the most communication). FSDP; full fine-tunes only")
    gradient_accumulation: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    text_encoder_lr: float | None = Field(None, gt=0, description="defaults to learning_rate")
    text_encoder_2_lr: float | None = Field(None, gt=0, description="SDXL's second text encoder (OpenCLIP-G); "
                                            "defaults to text_encoder_lr")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor"] = Field(
        "adamw", description="adafactor: factored second moments and no first moment: the smallest state, for "
        "full fine-tunes on small cards")
    weight_decay: float = Field(1e-2, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0, description="0 turns clipping off")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field("auto", description="auto: bf16 or fp16 on a GPU, fp32 on CPU")
    gradient_checkpointing: bool = False
    min_snr_gamma: float | None = Field(None, gt=0, description="min-SNR loss weighting; 5.0 is the paper's value")
    noise_offset: float = Field(0.0, ge=0, le=1)
    seed: int = 42
    compile: Literal["off", "blocks"] = Field("off", description="blocks: compile the UNet's repeated blocks "
                                              "(torch.compile, one region at a time): faster steps once the first "
                                              "step has compiled them (its time is reported apart, as 'compile')")
    channels_last: bool = Field(True, description="hold the UNet's weights channels-last (NHWC), the layout fast "
                                "convolution kernels want: faster steps, same results up to rounding")
    fused_backward: bool = Field(False, description="step each weight as soon as its gradient is ready, so all gradients never exist at once (one GPU; gradient clipping then applies per weight tensor)")
    weights_dtype: Literal["fp32", "bf16"] = Field("fp32", description="bf16: trained weights kept in bf16 with stochastic rounding (needs fused_backward and bf16 mixed precision)")
    ema: bool = Field(False, description="keep an exponential moving average of the trained weights and export it")
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="the EMA's final decay (it warms up to it)")
    ema_on_cpu: bool = Field(False, description="hold the EMA copy in CPU memory instead of on the GPU")
    checkpoint_every: int = Field(250, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    sample_every: int = Field(0, ge=0, description="validation samples every N steps; 0: only at the end")
    log_every: int = Field(10, ge=1, description="a step event (the mean loss since the last, speed, memory) every "
                           "N steps; the loss stays on the GPU in between, so a step waits for nothing (several "
                           "processes also agree on a stop every N steps)")
    log_with: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="also log loss, lr, validation loss and samples to these, through "
        "accelerate's trackers (TensorBoard under <run>/logs; W&B where installed); events.jsonl stays the record")


class PriorSection(Section):
    """Prior preservation (DreamBooth paper): train on class images too, so that the class word
    keeps meaning the class ("a photo of a dog" still gives all sorts of dogs)."""

    enabled: bool = False
    class_prompt: str = "a photo of {class_word}"
    @property
    def prompts(self) -> list[str]:
        """The prompts class pictures are generated from, in turn, their {a|b} choices spelled out."""
        return [p for template in self.class_prompts or [self.class_prompt] for p in spelled_out(template)]

    class_prompts: list[str] = Field(default_factory=list, description=(
        "several class prompts instead of class_prompt, taken in turn (class picture i from prompt i mod n), each "
        "picture captioned with its own prompt: class pictures as varied as the class, with their colours and "
        "backgrounds named, so that prior preservation keeps those words working too. {a|b|c} in a prompt stands "
        "for each choice in turn: 'a {red|blue} {class_word} on a {white|black} background' is four prompts"))
    class_data: str = Field("", description="folder of class images; empty: generate them with the base model")
    num_class_images: int = Field(100, ge=1, description="how many class images to use (generated if missing)")
    loss_weight: float = Field(1.0, gt=0, description="weight of the class images' loss")
    generation_steps: int = Field(25, ge=1)
    generation_guidance: float = Field(7.5, ge=0)
    generation_batch_size: int = Field(4, ge=1)
    output_preservation: float = Field(0.0, ge=0, description=(
        "weight of differential output preservation (ai-toolkit's idea; 0: off): each step also denoises the "
        "training pictures captioned without the trigger, with the untouched model's prediction (the adapter switched "
        "off) as the target, so that prompts without the trigger keep drawing what they drew. Needs no class "
        "pictures and no second model; adapter methods only"))


class SampleSection(Section):
    prompts: list[str] = Field(default_factory=lambda: ["a photo of {trigger} {class_word}"])
    negative_prompt: str = ""
    steps: int = Field(25, ge=1, le=500)
    guidance_scale: float = Field(7.5, ge=0)
    seed: int = 7
    images_per_prompt: int = Field(2, ge=1, le=16)
    at_checkpoints: bool = Field(False, description="draw the prompts at every checkpoint too (same seeds), for "
                                 "the studio's checkpoint grid")
    scheduler: str = Field("", description="the sampler by its A1111 name (Euler a, DPM++ 2M Karras, UniPC, ...); "
                           "empty: the base's DDIM")
    clip_skip: int | None = Field(None, ge=1, le=12, description="A1111's CLIP skip (2: the next-to-last layer)")

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        from ..errors import DreamloomError
        from ..sampling.schedulers import scheduler_name  # the names live with the schedulers

        try:
            return scheduler_name(value) if value else value
        except DreamloomError as exc:  # pydantic reports ValueErrors with the key's name
            raise ValueError(str(exc)) from None


class ExportSection(Section):
    output_name: str = Field("", description="file name of the exports; default: <trigger>-<method>")
    formats: list[str] | None = Field(None, description="default: every format the method writes")
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
