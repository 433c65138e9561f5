"""The typed recipe: everything a run needs, in one TOML file that can be shared and re-run.

The shared sections live in sections.py; each method's own sections (and which export formats it
has) come from the method's module through the registry, so adding a method adds its keys here.
Every section forbids unknown keys, so a typo is an error that names the key, never a setting
that silently does nothing. Bump SCHEMA_VERSION and add a migration in io.py when a key changes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, create_model, model_validator

from ..captions import fill_placeholders
from ..trainers.registry import METHODS, section_types
from .sections import (BaseSection, DataSection, ExportSection, PriorSection, SampleSection, Section,
                       TrainSection)

SCHEMA_VERSION = 1
SECTION_TYPES = section_types()  # [name] -> pydantic model, over every method


def method_sections(method: str) -> tuple[str, ...]:
    return tuple(METHODS[method].sections)


def method_formats(method: str) -> tuple[str, ...]:
    """The method's export formats; the first is its main export."""
    return tuple(f.name for f in METHODS[method].formats)


class RecipeRules(Section):
    """The rules about a recipe as a whole (its fields are made below, from the registry)."""

    @model_validator(mode="after")
    def _method_sections(self):
        own = method_sections(self.method)
        for name, section_type in SECTION_TYPES.items():
            if name in own and getattr(self, name) is None:
                setattr(self, name, section_type())
            elif name not in own and getattr(self, name) is not None:
                raise ValueError(f"section [{name}] does not apply to method '{self.method}' (it would be "
                                 f"ignored); remove it, or set method to one that uses it")
        d, t = self.data, self.train
        if d.buckets and d.bucket_step > min(d.all_resolutions):
            raise ValueError(f"data.bucket_step = {d.bucket_step} is larger than data.resolution(s) "
                             f"{d.all_resolutions}: buckets would have no side; use a step of at most "
                             f"{min(d.all_resolutions)} (64 for 512 px and up)")
        if t.weights_dtype == "bf16" and not (t.fused_backward and t.mixed_precision in ("bf16", "auto")):
            raise ValueError("train.weights_dtype = 'bf16' needs train.fused_backward = true and "
                             "train.mixed_precision = 'bf16' (or 'auto' on a bf16 GPU)")
        if t.fused_backward and t.processes > 1:
            raise ValueError("train.fused_backward steps each weight before its gradient is averaged across "
                             "processes; use it with train.processes = 1")
        if self.prior.output_preservation and not METHODS[self.method].switchable:
            able = ", ".join(name for name, m in METHODS.items() if m.switchable)
            raise ValueError(f"prior.output_preservation compares the model with its adapter switched off; method "
                             f"'{self.method}' has none to switch off: use one of {able}, or prior.enabled "
                             "(class pictures)")
        if t.strategy != "ddp" and not METHODS[self.method].full_finetune:
            raise ValueError(f"train.strategy = '{t.strategy}' shards the weights of a full fine-tune; method "
                             f"'{self.method}' trains a small adapter that every process holds whole: use 'ddp'")
        if t.strategy != "ddp" and t.ema:
            raise ValueError(f"train.ema is not kept for sharded weights (train.strategy = '{t.strategy}'); "
                             "set train.ema = false, or train.strategy = 'ddp'")
        if t.strategy != "ddp" and t.mixed_precision == "fp16":
            raise ValueError(f"train.strategy = '{t.strategy}' cannot scale fp16 losses; use mixed_precision 'bf16' or 'no'")
        if t.fused_backward and t.mixed_precision == "fp16":
            raise ValueError("train.fused_backward cannot use fp16 loss scaling; use mixed_precision 'bf16' or 'no'")
        if self.prior.enabled and not self.prior.class_data and any("{class_word}" in p for p in self.prior.prompts) \
                and not self.data.class_word:
            raise ValueError("prior preservation generates class images from prior.class_prompt, which needs "
                             "data.class_word (e.g. --class-word dog)")
        allowed = method_formats(self.method)
        if self.export.formats is None:
            self.export.formats = list(allowed)
        unknown = [f for f in self.export.formats if f not in allowed]
        if unknown or not self.export.formats:
            raise ValueError(f"export.formats {self.export.formats} for method '{self.method}': "
                             f"choose from {list(allowed)}")
        return self

    def notes(self, arch=None) -> list[str]:
        """Settings that do nothing in this combination, or that fit the base badly (with its architecture):
        said, naming the key, instead of ignored silently."""
        notes = []
        anew = [key for key, on in (("data.crop = 'random'", self.data.crop == "random"),
                                    ("data.hue_jitter > 0", self.data.hue_jitter > 0)) if on]
        if self.data.cache_latents and anew:
            notes.append(f"data.cache_latents = true does nothing with {' and '.join(anew)} (each step makes its "
                         "pictures anew, so every picture is encoded every time); set data.cache_latents = false to "
                         "say so")
        d, default = self.data, DataSection()
        tags, tags_need = d.varied_captions, "data.shuffle_tags = true or data.tag_dropout > 0"
        for key, on, needs in (("keep_tokens", tags, tags_need), ("keep_tokens_separator", tags, tags_need),
                               ("unmasked_weight", d.masked_loss, "data.masked_loss = true"),
                               *((key, d.buckets, "data.buckets = true")
                                 for key in ("bucket_step", "bucket_max_aspect", "bucket_max_upscale"))):
            if getattr(d, key) != getattr(default, key) and not on:
                notes.append(f"data.{key} = {getattr(d, key)!r} does nothing without {needs}")
        if arch is not None and arch.version is None and self.data.resolution < 0.75 * arch.resolution:
            notes.append(f"data.resolution = {self.data.resolution}: {arch.name} was trained at {arch.resolution} px; "
                         "smaller pictures teach it a blurrier, differently framed subject. Use "
                         f"data.resolution = {arch.resolution} unless memory forbids it")
        return notes

    def fill(self, text: str) -> str:
        """Fill {trigger} and {class_word} in a prompt or caption."""
        return fill_placeholders(text, self.data.trigger, self.data.class_word)

    @property
    def output_name(self) -> str:
        return self.export.output_name or f"{self.data.trigger}-{self.method}"


Recipe = create_model(
    "Recipe",
    __base__=RecipeRules,
    __module__=__name__,
    schema_version=(int, SCHEMA_VERSION),
    name=(str, Field("custom", min_length=1)),
    description=(str, ""),
    method=(Literal[tuple(METHODS)], "lora"),
    base=(BaseSection, Field(default_factory=BaseSection)),
    data=(DataSection, Field(default_factory=DataSection)),
    train=(TrainSection, Field(default_factory=TrainSection)),
    prior=(PriorSection, Field(default_factory=PriorSection)),
    **{name: (section_type | None, None) for name, section_type in SECTION_TYPES.items()},
    sample=(SampleSection, Field(default_factory=SampleSection)),
    export=(ExportSection, Field(default_factory=ExportSection)),
)
