"""The typed recipe: everything a run needs, in one TOML file that can be shared and re-run.

Every section forbids unknown keys, so a typo is an error that names the key, never a setting
that silently does nothing. Bump SCHEMA_VERSION and add a migration in io.py when a key changes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseSection(Section):
    model: str = Field("tiny", description="tiny | random:sd15 | random:sd21 | diffusers folder | .safetensors file | hub id")


class DataSection(Section):
    path: str = Field("", description="folder of images (+ .txt captions) or a datasets imagefolder")
    trigger: str = Field("sks", min_length=1, description="the new word that names the subject or style")
    class_word: str = Field("", description="what the subject is (dog, person, style)")
    caption_template: str = "a photo of {trigger} {class_word}"
    resolution: int = Field(512, ge=32, le=2048, multiple_of=8)
    crop: Literal["center", "random"] = "center"
    flip: bool = Field(False, description="random horizontal flips (off for subjects with text/asymmetry)")
    repeats: int = Field(1, ge=1, le=1000)
    min_image_size: int = Field(64, ge=1, description="images smaller than this (shorter side, px) are refused")
    cache_latents: bool = Field(True, description="encode each image once; the VAE leaves memory while training")
    caption_dropout: float = Field(0.0, ge=0, lt=1, description="share of examples trained with an empty caption "
                                   "(what classifier-free guidance needs when pretraining)")


class TrainSection(Section):
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    text_encoder_lr: float | None = Field(None, gt=0, description="defaults to learning_rate")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = "adamw"
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
    fused_backward: bool = Field(False, description="step each weight as soon as its gradient is ready, so all gradients never exist at once (one GPU; gradient clipping then applies per weight tensor)")
    weights_dtype: Literal["fp32", "bf16"] = Field("fp32", description="bf16: trained weights kept in bf16 with stochastic rounding (needs fused_backward and bf16 mixed precision)")
    ema: bool = Field(False, description="keep an exponential moving average of the trained weights and export it")
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="the EMA's final decay (it warms up to it)")
    ema_on_cpu: bool = Field(False, description="hold the EMA copy in CPU memory instead of on the GPU")
    checkpoint_every: int = Field(250, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    sample_every: int = Field(0, ge=0, description="validation samples every N steps; 0: only at the end")
    log_every: int = Field(1, ge=1)


class LoraSection(Section):
    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0, description="scale = alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train_text_encoder: bool = False
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )


class PriorSection(Section):
    """Prior preservation (DreamBooth paper): train on class images too, so that the class word
    keeps meaning the class ("a photo of a dog" still gives all sorts of dogs)."""

    enabled: bool = False
    class_prompt: str = "a photo of {class_word}"
    class_data: str = Field("", description="folder of class images; empty: generate them with the base model")
    num_class_images: int = Field(100, ge=1, description="how many class images to use (generated if missing)")
    loss_weight: float = Field(1.0, gt=0, description="weight of the class images' loss")
    generation_steps: int = Field(25, ge=1)
    generation_guidance: float = Field(7.5, ge=0)
    generation_batch_size: int = Field(4, ge=1)


class DreamboothSection(Section):
    train_text_encoder: bool = False
    text_encoder_steps: int | None = Field(None, ge=0, description="stop training the text encoder after this step; empty: never")


class HypernetworkSection(Section):
    """AUTOMATIC1111's hypernetwork: per context width, two MLPs that shift attention's k and v."""

    layer_structure: list[float] = Field(default_factory=lambda: [1.0, 2.0, 1.0])
    activation: str = Field("linear", description="linear relu leakyrelu elu swish tanh sigmoid softsign mish")
    layer_norm: bool = False
    dropout: bool = False
    dropout_structure: list[float] | None = Field(None, description="per layer; empty: A1111's default for `dropout`")
    last_layer_dropout: bool = False
    activate_output: bool = False
    weight_init: Literal["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"] = "Normal"
    allow_unportable: bool = Field(False, description="allow an activation ComfyUI cannot load (A1111 only)")


class TextualInversionSection(Section):
    """New token(s) for data.trigger whose embedding vectors are the only weights that train."""

    vectors: int = Field(1, ge=1, le=16, description="vectors (tokens) the trigger stands for: <trigger>, "
                         "<trigger>_1, ...; more vectors hold more detail and need more steps")
    init_word: str = Field("*", min_length=1, description="the vectors start from this word's embedding; a word "
                           "of several tokens is laid across the vectors as A1111 does (vector i starts from "
                           "token i*k//n of its k tokens): vectors = k starts from exactly the whole word")
    template: Literal["object", "style", "caption"] = Field(
        "object", description="object | style: each image's prompt is a template ('a photo of a {trigger}', "
        "'a painting in the style of {trigger}', ...); caption: the dataset's captions (.txt or "
        "data.caption_template), which must name the trigger")
    learning_rate: float | None = Field(None, gt=0, description="the embedding's learning rate; "
                                        "empty: train.learning_rate")
    allow_known_trigger: bool = Field(False, description="train a trigger the tokenizer already knows as one token "
                                      "(its old meaning is lost in prompts); warned instead of refused")


class SampleSection(Section):
    prompts: list[str] = Field(default_factory=lambda: ["a photo of {trigger} {class_word}"])
    negative_prompt: str = ""
    steps: int = Field(25, ge=1, le=500)
    guidance_scale: float = Field(7.5, ge=0)
    seed: int = 7
    images_per_prompt: int = Field(2, ge=1, le=16)


class ExportSection(Section):
    output_name: str = Field("", description="file name of the exports; default: <trigger>-<method>")
    formats: list[str] | None = Field(None, description="default: every format the method writes")
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"


# Which sections and export formats each method has; the first formats entry is the main export.
METHOD_SECTIONS = {"lora": ("lora",), "dreambooth": ("dreambooth",), "hypernetwork": ("hypernetwork",),
                   "textual_inversion": ("textual_inversion",), "pivotal": ("lora", "textual_inversion")}
METHOD_FORMATS = {
    "lora": ("kohya", "diffusers"),
    "dreambooth": ("single_file", "diffusers"),
    "hypernetwork": ("pt", "safetensors"),
    # Embeddings are named <trigger>.*: a1111 = <trigger>.safetensors (emb_params), a1111_pt = <trigger>.pt,
    # diffusers = diffusers/learned_embeds.safetensors. pivotal: bundle = the kohya LoRA with the embedding
    # inside (bundle_emb.*), kohya / diffusers_lora = the LoRA alone.
    "textual_inversion": ("a1111", "a1111_pt", "diffusers"),
    "pivotal": ("bundle", "kohya", "diffusers_lora", "a1111", "a1111_pt", "diffusers"),
}
SECTION_TYPES = {"lora": LoraSection, "dreambooth": DreamboothSection, "hypernetwork": HypernetworkSection,
                 "textual_inversion": TextualInversionSection}


class Recipe(Section):
    schema_version: int = SCHEMA_VERSION
    name: str = Field("custom", min_length=1)
    description: str = ""
    method: Literal["lora", "dreambooth", "hypernetwork", "textual_inversion", "pivotal"] = "lora"
    base: BaseSection = Field(default_factory=BaseSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    prior: PriorSection = Field(default_factory=PriorSection)
    lora: LoraSection | None = None
    dreambooth: DreamboothSection | None = None
    hypernetwork: HypernetworkSection | None = None
    textual_inversion: TextualInversionSection | None = None
    sample: SampleSection = Field(default_factory=SampleSection)
    export: ExportSection = Field(default_factory=ExportSection)

    @model_validator(mode="after")
    def _method_sections(self) -> "Recipe":
        own = METHOD_SECTIONS[self.method]
        for name, section_type in SECTION_TYPES.items():
            if name in own and getattr(self, name) is None:
                setattr(self, name, section_type())
            elif name not in own and getattr(self, name) is not None:
                raise ValueError(f"section [{name}] does not apply to method '{self.method}' (it would be "
                                 f"ignored); remove it, or set method to one that uses it")
        t = self.train
        if t.weights_dtype == "bf16" and not (t.fused_backward and t.mixed_precision in ("bf16", "auto")):
            raise ValueError("train.weights_dtype = 'bf16' needs train.fused_backward = true and "
                             "train.mixed_precision = 'bf16' (or 'auto' on a bf16 GPU)")
        if t.fused_backward and t.mixed_precision == "fp16":
            raise ValueError("train.fused_backward cannot use fp16 loss scaling; use mixed_precision 'bf16' or 'no'")
        if self.prior.enabled and not self.prior.class_data and "{class_word}" in self.prior.class_prompt \
                and not self.data.class_word:
            raise ValueError("prior preservation generates class images from prior.class_prompt, which needs "
                             "data.class_word (e.g. --class-word dog)")
        allowed = METHOD_FORMATS[self.method]
        if self.export.formats is None:
            self.export.formats = list(allowed)
        unknown = [f for f in self.export.formats if f not in allowed]
        if unknown or not self.export.formats:
            raise ValueError(f"export.formats {self.export.formats} for method '{self.method}': "
                             f"choose from {list(allowed)}")
        return self

    def fill(self, text: str) -> str:
        """Fill {trigger} and {class_word} in a prompt or caption."""
        filled = text.replace("{trigger}", self.data.trigger)
        return " ".join(filled.replace("{class_word}", self.data.class_word).split())

    @property
    def output_name(self) -> str:
        return self.export.output_name or f"{self.data.trigger}-{self.method}"
