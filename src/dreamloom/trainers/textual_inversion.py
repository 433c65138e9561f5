"""Textual inversion (Gal et al. 2022): new tokens for the trigger word, whose embedding vectors are
the only weights that train.

The trigger stands for n tokens, `<trigger>`, `<trigger>_1`, ..., as A1111 and diffusers name a
multi-vector embedding; a caption's trigger is spelled out as all n of them, as diffusers'
`maybe_convert_prompt` does for prompts. The embedding matrix itself is never written: the text
encoder's token embedding is wrapped by `TriggerEmbedding`, which reads the new ids from a small
[n, dim] parameter and every other id from the frozen matrix. So every other row, and every other
text-encoder weight, stays bit-identical, and AdamW's weight decay reaches nothing but the vectors.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..errors import RecipeError
from ..recipes.sections import Section
from .method import Format, Method, ParamGroups, freeze, unwrap


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


# Embedding files are named after the trigger: other UIs take the prompt word from the file name.
FORMATS = (
    Format("a1111", "{trigger}.safetensors", "A1111/Forge, ComfyUI, InvokeAI", attach="embedding"),
    Format("a1111_pt", "{trigger}.pt", "A1111/Forge, ComfyUI", attach="embedding"),
    Format("diffusers", "diffusers/learned_embeds.safetensors", "diffusers (load_textual_inversion)",
           attach="embedding"),
)

# A few of the templates of the paper's code (and diffusers' textual_inversion example).
TEMPLATES = {
    "object": ["a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
               "a photo of a clean {}", "a dark photo of the {}", "a photo of my {}", "a close-up photo of a {}",
               "a bright photo of the {}", "a good photo of a {}", "a photo of one {}", "a rendition of the {}"],
    "style": ["a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
              "the painting in the style of {}", "a clean painting in the style of {}", "art in the style of {}",
              "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
              "a close-up painting in the style of {}", "a bright painting in the style of {}",
              "a good painting in the style of {}"],
}
TRIGGER_CHARS = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
EMBEDDING_KEY = "embedding"  # the vectors' name in checkpoints


def token_names(trigger: str, vectors: int) -> list[str]:
    return [trigger] + [f"{trigger}_{i}" for i in range(1, vectors)]


def check_trigger(tokenizer, trigger: str, vectors: int, allow_known: bool) -> str | None:
    """Refuse a trigger the tokenizer already has (RecipeError naming the key and the fix); return the
    warning for a known word that the recipe allows."""
    names = token_names(trigger, vectors)
    taken = [name for name in names if name in tokenizer.get_vocab()]  # added tokens are in it too
    if taken:
        raise RecipeError(
            f"data.trigger = '{trigger}': the tokenizer already has the token(s) {taken} (another embedding, or a "
            "piece of its vocabulary); a new embedding cannot take that name. Choose another --trigger.")
    pieces = tokenizer.tokenize(trigger)
    if len(pieces) == 1:
        message = (f"data.trigger = '{trigger}' is already a word the tokenizer knows as one token ({pieces[0]!r}); "
                   "training an embedding for it takes that meaning away from every prompt that uses the word")
        if not allow_known:
            raise RecipeError(f"{message}. Pick a rare made-up word (e.g. 'sks' on the built-in tokenizer, 'zwx' or "
                              "'ohwx'), or set textual_inversion.allow_known_trigger = true to train it anyway.")
        return f"{message} (textual_inversion.allow_known_trigger = true)."
    return None


def trigger_embeddings(base) -> dict:
    """The trigger's embedding in each text encoder, by part name."""
    from ..models.embedding import TriggerEmbedding

    found = {part: unwrap(getattr(base, part)).get_input_embeddings() for part in base.family.text_encoders}
    if not all(isinstance(e, TriggerEmbedding) for e in found.values()):
        raise RuntimeError("the text encoder has no trigger embedding; call the method's prepare first")
    return found


def trigger_vectors(base) -> dict:
    """{text-encoder part: its trained [n, dim] vectors}, detached: what exports write."""
    return {part: e.vectors.detach() for part, e in trigger_embeddings(base).items()}


def embedding_key(base, part: str) -> str:
    """The vectors' name in checkpoints: `embedding` (the first text encoder), `embedding.<part>` (others)."""
    return EMBEDDING_KEY if part == base.family.text_encoders[0] else f"{EMBEDDING_KEY}.{part}"


def check_formats(recipe, base) -> None:
    """A1111's .pt embedding holds one text encoder's vectors: none for a family with two (SDXL)."""
    if base.family.embedding_keys is not None and "a1111_pt" in recipe.export.formats:
        raise RecipeError(f"export.formats 'a1111_pt': an A1111 .pt embedding holds one text encoder's vectors, and "
                          f"{base.family.title} has {len(base.family.text_encoders)}; use 'a1111' (one .safetensors with "
                          f"{' and '.join(base.family.embedding_keys.values())}, what A1111/Forge and ComfyUI load).")


class TextualInversionMethod(Method):
    name = "textual_inversion"
    sections = {"textual_inversion": TextualInversionSection}
    formats = FORMATS
    help = ("Textual inversion: learns only a new word (an embedding of a few KB). Weakest, smallest, works with "
            "any model of the family.")
    toy_recipe = "toy-ti"

    def __init__(self, recipe, inside: str | None = None):
        """`inside`: the name of the method this one is part of (pivotal tuning), if any."""
        super().__init__(recipe)
        trigger = recipe.data.trigger
        if not TRIGGER_CHARS.match(trigger):
            raise RecipeError(
                f"data.trigger = '{trigger}': an embedding's trigger must be one lowercase word of letters, digits, "
                "'_' or '-' (CLIP lowercases prompts, and other UIs use the file name, <trigger>.safetensors, as "
                "the prompt word). E.g. --trigger mystyle.")
        self.warned = False
        if recipe.prior.enabled and (inside is None or self.section.template != "caption"):
            raise RecipeError(
                "prior.enabled: textual inversion changes no weight the class word uses, so there is nothing to "
                "preserve; turn prior preservation off." if inside is None else
                f"prior.enabled with textual_inversion.template = '{self.section.template}': the templates would "
                "replace the class images' prompts too; use template = 'caption' with prior preservation.")
        if inside is None and recipe.train.text_encoder_lr is not None:
            raise RecipeError("train.text_encoder_lr: textual inversion trains no text-encoder weight, only the new "
                              "vectors; set their rate with textual_inversion.learning_rate instead.")
        from ..models.specs import spec_tokenizers

        for tokenizer in spec_tokenizers(recipe.base.model) or ():
            self.check(tokenizer)

    @property
    def section(self):
        return self.recipe.textual_inversion

    def trainable_parts(self, base) -> tuple[str, ...]:
        return base.family.text_encoders  # the vectors live in the text encoders' token embeddings

    def check(self, tokenizer) -> None:
        warning = check_trigger(tokenizer, self.recipe.data.trigger, self.section.vectors,
                                self.section.allow_known_trigger)
        if warning and not self.warned:
            warnings.warn(warning, UserWarning, stacklevel=2)
            self.warned = True

    def install(self, base) -> list:
        """Add the trigger's tokens to each tokenizer and its vectors to each text encoder (frozen elsewhere)."""
        from ..models.embedding import init_vectors, install_embedding

        vectors = []
        names = token_names(self.recipe.data.trigger, self.section.vectors)
        for tokenizer_name, part in zip(base.family.tokenizers, base.family.text_encoders):
            tokenizer, te = getattr(base, tokenizer_name), unwrap(getattr(base, part))
            self.check(tokenizer)
            start = init_vectors(tokenizer, te.get_input_embeddings().weight, self.section.init_word,
                                 self.section.vectors)
            vectors.append(install_embedding(tokenizer, te, names, start).vectors)
        return vectors

    def prepare(self, base) -> ParamGroups:
        check_formats(self.recipe, base)
        freeze(base)
        return [self.param_group(self.install(base))]

    def param_group(self, vectors: list) -> dict:
        return {"params": vectors, "lr": self.section.learning_rate or self.recipe.train.learning_rate}

    def prompts(self, captions: list[str], generator) -> list[str]:
        """Training prompts: a template per image (object, style), chosen with a generator seeded from the
        batch's own (the same per step on resume; the noise stream is untouched), or the caption; then the
        trigger spelled out as all its tokens."""
        import torch

        trigger = self.recipe.data.trigger
        templates = TEMPLATES.get(self.section.template)
        g = torch.Generator().manual_seed(generator.initial_seed() ^ 0x7E47)
        out = []
        for caption in captions:
            if templates:
                caption = templates[int(torch.randint(len(templates), (), generator=g))].format(trigger)
            out.append(expand_trigger(caption, trigger, self.section.vectors))
        return out

    def loss(self, base, batch):
        import dataclasses

        from .noise_loss import noise_loss

        tokens = base.family.tokenize(base, self.prompts(batch.captions, batch.generator))
        return noise_loss(base, dataclasses.replace(batch, tokens=tokens, cond=None), self.recipe.train)

    def state_dict(self, base) -> dict:
        return {embedding_key(base, part): v for part, v in trigger_vectors(base).items()}

    def load_state_dict(self, base, state) -> None:
        import torch

        for part, embedding in trigger_embeddings(base).items():
            saved = state.get(embedding_key(base, part))
            if saved is None or saved.shape != embedding.vectors.shape:
                raise ValueError(f"checkpoint embedding {None if saved is None else tuple(saved.shape)} does not fit "
                                 f"this run's {tuple(embedding.vectors.shape)}")
            with torch.no_grad():
                embedding.vectors.copy_(saved)

    def export(self, base, run, formats, overwrite=False) -> list[Path]:
        from ..export.embeddings import export_embedding

        paths = {f: self.export_path(run, f) for f in formats}
        return export_embedding(paths, run, base, self.recipe, trigger_vectors(base), overwrite)


def expand_trigger(text: str, trigger: str, vectors: int) -> str:
    """`a photo of sks` -> `a photo of sks sks_1 sks_2` (CLIP lowercases, so any case matches)."""
    if vectors == 1:
        return text
    return re.sub(re.escape(trigger), " ".join(token_names(trigger, vectors)), text, flags=re.IGNORECASE)
