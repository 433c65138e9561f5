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

import dataclasses
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import RecipeError
from ..export.embeddings import export_embedding
from .method import Method, ParamGroups, unwrap
from .noise_loss import noise_loss

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


def init_vectors(tokenizer, matrix: torch.Tensor, init_word: str, vectors: int) -> torch.Tensor:
    """[n, dim] starting values: the init word's token embeddings laid across the vectors as A1111
    does (vector i starts from token i*k//n of its k tokens)."""
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise RecipeError(f"textual_inversion.init_word = {init_word!r} has no tokens; give a word such as 'object'.")
    k = len(ids)
    if k > vectors:
        warnings.warn(
            f"textual_inversion.init_word = {init_word!r} is {k} tokens {tokenizer.convert_ids_to_tokens(ids)} but the "
            f"embedding has {vectors} vector(s): the vectors start from tokens "
            f"{[i * k // vectors for i in range(vectors)]} only. Use a one-token init word, or vectors = {k}.",
            UserWarning, stacklevel=3)
    return torch.stack([matrix[ids[i * k // vectors]] for i in range(vectors)]).detach().float().clone()


class TriggerEmbedding(nn.Module):
    """A token embedding that reads ids first..first+n-1 from `vectors` (trained) and every other id
    from the frozen embedding (never written)."""

    def __init__(self, frozen: nn.Embedding, first_id: int, vectors: torch.Tensor):
        super().__init__()
        self.frozen = frozen
        self.first_id = first_id
        self.vectors = nn.Parameter(vectors.to(frozen.weight.device))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        offset = input_ids - self.first_id
        new = (offset >= 0) & (offset < len(self.vectors))
        old = self.frozen(input_ids.masked_fill(new, 0))
        # Always in the graph (zero gradient when no trigger is present): DDP sees every parameter used.
        rows = self.vectors.to(old.dtype)[offset.clamp(0, len(self.vectors) - 1)]
        return torch.where(new.unsqueeze(-1), rows, old)

    def matrix(self) -> torch.Tensor:
        """The embedding matrix as a model with this embedding loaded has it (diffusers' layout)."""
        return torch.cat([self.frozen.weight[:self.first_id].float(), self.vectors.detach().float()])


def trigger_embedding(base) -> TriggerEmbedding:
    module = unwrap(base.text_encoder).get_input_embeddings()
    if not isinstance(module, TriggerEmbedding):
        raise RuntimeError("the text encoder has no trigger embedding; call the method's prepare first")
    return module


def tokenizer_without_model(spec: str):
    """The base's tokenizer where it can be had without loading the model (built-in bases, a diffusers
    folder, a .safetensors checkpoint), so that a bad trigger is refused before any run exists;
    else None (prepare checks it on the loaded base)."""
    from ..models.tokenizer import build_tokenizer

    if spec in ("tiny", "toy") or spec.startswith("random:"):
        return build_tokenizer()
    path = Path(spec).expanduser()
    try:
        if path.is_dir() and (path / "tokenizer").is_dir():
            from transformers import CLIPTokenizer

            return CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        if path.is_file() and path.suffix.lower() == ".safetensors":
            from ..models.single_file import CLIP_TOKENS, OPEN_CLIP_TOKENS, detect_arch, load_tokenizer, read_header

            shapes, metadata = read_header(path)
            vocab_size = shapes[OPEN_CLIP_TOKENS if OPEN_CLIP_TOKENS in shapes else CLIP_TOKENS][0]
            return load_tokenizer(path, detect_arch(path, shapes), vocab_size, metadata)
    except Exception:  # loading the base reports what is wrong with it
        return None
    return None


class TextualInversionMethod(Method):
    name = "textual_inversion"
    trainable_modules = ("text_encoder",)  # the vectors live in the text encoder's token embedding

    def __init__(self, recipe):
        super().__init__(recipe)
        trigger = recipe.data.trigger
        if not TRIGGER_CHARS.match(trigger):
            raise RecipeError(
                f"data.trigger = '{trigger}': an embedding's trigger must be one lowercase word of letters, digits, "
                "'_' or '-' (CLIP lowercases prompts, and other UIs use the file name, <trigger>.safetensors, as "
                "the prompt word). E.g. --trigger mystyle.")
        self.warned = False
        alone = recipe.method == self.name  # not inside pivotal tuning, where a LoRA trains too
        if recipe.prior.enabled and (alone or self.section.template != "caption"):
            raise RecipeError(
                "prior.enabled: textual inversion changes no weight the class word uses, so there is nothing to "
                "preserve; turn prior preservation off." if alone else
                f"prior.enabled with textual_inversion.template = '{self.section.template}': the templates would "
                "replace the class images' prompts too; use template = 'caption' with prior preservation.")
        tokenizer = tokenizer_without_model(recipe.base.model)
        if tokenizer is not None:
            self.check(tokenizer)

    @property
    def section(self):
        return self.recipe.textual_inversion

    def check(self, tokenizer) -> None:
        warning = check_trigger(tokenizer, self.recipe.data.trigger, self.section.vectors,
                                self.section.allow_known_trigger)
        if warning and not self.warned:
            warnings.warn(warning, UserWarning, stacklevel=2)
            self.warned = True

    def install(self, base) -> nn.Parameter:
        """Add the trigger's tokens to the tokenizer and its vectors to the text encoder (frozen elsewhere)."""
        tokenizer, te = base.tokenizer, unwrap(base.text_encoder)
        self.check(tokenizer)
        frozen = te.get_input_embeddings()
        start = init_vectors(tokenizer, frozen.weight, self.section.init_word, self.section.vectors)
        names = token_names(self.recipe.data.trigger, self.section.vectors)
        tokenizer.add_tokens(names)
        ids = tokenizer.convert_tokens_to_ids(names)
        if ids != list(range(ids[0], ids[0] + len(ids))) or ids[0] != len(tokenizer) - len(ids):
            raise RuntimeError(f"the tokenizer gave the new tokens ids {ids}, not the last consecutive ones")
        embedding = TriggerEmbedding(frozen, ids[0], start)
        te.set_input_embeddings(embedding)
        return embedding.vectors

    def prepare(self, base) -> ParamGroups:
        for part in ("unet", "vae", "text_encoder"):
            getattr(base, part).requires_grad_(False)
        return [self.param_group(self.install(base))]

    def param_group(self, vectors: nn.Parameter) -> dict:
        return {"params": [vectors], "lr": self.section.learning_rate or self.recipe.train.learning_rate}

    def prompts(self, captions: list[str], generator: torch.Generator) -> list[str]:
        """Training prompts: a template per image (object, style), chosen with a generator seeded from the
        batch's own (the same per step on resume; the noise stream is untouched), or the caption; then the
        trigger spelled out as all its tokens."""
        trigger = self.recipe.data.trigger
        templates = TEMPLATES.get(self.section.template)
        g = torch.Generator().manual_seed(generator.initial_seed() ^ 0x7E47)
        out = []
        for caption in captions:
            if templates:
                caption = templates[int(torch.randint(len(templates), (), generator=g))].format(trigger)
            out.append(expand_trigger(caption, trigger, self.section.vectors))
        return out

    def loss(self, base, batch) -> torch.Tensor:
        tokenizer = base.tokenizer
        ids = tokenizer(self.prompts(batch.captions, batch.generator), padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        return noise_loss(base, dataclasses.replace(batch, input_ids=ids, hidden_states=None), self.recipe.train)

    def state_dict(self, base) -> dict[str, torch.Tensor]:
        return {EMBEDDING_KEY: trigger_embedding(base).vectors.detach()}

    def load_state_dict(self, base, state) -> None:
        vectors = trigger_embedding(base).vectors
        saved = state.get(EMBEDDING_KEY)
        if saved is None or saved.shape != vectors.shape:
            raise ValueError(f"checkpoint embedding {None if saved is None else tuple(saved.shape)} does not fit "
                             f"this run's {tuple(vectors.shape)}")
        with torch.no_grad():
            vectors.copy_(saved)

    def export(self, base, run, formats, overwrite=False) -> list[Path]:
        return export_embedding(run, base, self.recipe, trigger_embedding(base).vectors.detach(), formats, overwrite)


def expand_trigger(text: str, trigger: str, vectors: int) -> str:
    """`a photo of sks` -> `a photo of sks sks_1 sks_2` (CLIP lowercases, so any case matches)."""
    if vectors == 1:
        return text
    return re.sub(re.escape(trigger), " ".join(token_names(trigger, vectors)), text, flags=re.IGNORECASE)
