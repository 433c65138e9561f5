"""What the Train page offers: recipes to start from (built-in, saved in the studio's home, a job to
re-run), the settings that matter with plain-language help, and building the final recipe."""

from __future__ import annotations

import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

from ..errors import DreamloomError, RecipeError
from ..estimate import GiB, estimate
from ..models.specs import builtin_specs, parse_base_spec
from ..recipes import Recipe, builtin_names, builtin_text, dump_recipe
from ..recipes.io import apply_overrides, validate
from ..recipes.sections import BaseSection
from ..trainers.registry import METHODS
from .uploads import clean_name

DEFAULT_METHOD = "lora"
SAVED_RECIPES = "saved-recipes"  # under the home
DEFAULT_BASE = "toy"  # pretrained: real pictures, and it trains on a laptop CPU in minutes
FALLBACK_BASE = "tiny"
BUILTIN_BASES = builtin_specs()  # toy first: the default
BASE_KINDS = ["Built-in", "Local file or folder", "Hugging Face hub id"]


def base_kind(spec: str) -> int:
    """Which of BASE_KINDS a spec is (a path that does not exist yet counts as a hub id's text field)."""
    try:
        kind = parse_base_spec(spec).kind
    except DreamloomError:
        return 2
    return {"builtin": 0, "random": 0, "folder": 1, "file": 1}.get(kind, 2)


@dataclass(frozen=True)
class RecipeChoice:
    label: str  # as the picker shows it
    text: str  # the recipe's TOML
    method: str


@dataclass(frozen=True)
class Setting:
    key: str  # dotted recipe key
    label: str
    help: str
    full_finetunes_only: bool = False  # shown for methods that train whole parts (DreamBooth)

    def applies(self, recipe: Recipe) -> bool:
        return recipe_value(recipe, self.key) is not None and (
            not self.full_finetunes_only or METHODS[recipe.method].full_finetune)


# The settings most people change, in plain words. Others stay as the recipe has them (download
# the TOML to change those). A setting shows only when the recipe has its section. Numbers first,
# then choices, then switches: the page lays them out in that order.
SETTINGS = [
    Setting("train.steps", "Training steps", "How long to train. More steps learn more detail; too many and every "
            "picture looks like your photos. The toy base: a few hundred. SD 1.5: about 100 per training image."),
    Setting("train.learning_rate", "Learning rate", "How big each correction is. Too high and pictures turn to "
            "noise; too low and nothing changes. The recipe's value is a good start."),
    Setting("train.batch_size", "Images per step", "More images per step give smoother training but need more "
                                                   "GPU memory."),
    Setting("data.resolution", "Resolution (px)", "Pictures are cropped square to this size (with buckets: to this "
            "area). Match the base model: 64 for toy and tiny, 512 for SD 1.5, 768 for SD 2.1, 1024 for SDXL."),
    Setting("data.validation_split", "Held out for validation (share)", "This share of the pictures is not trained "
            "on; its loss at every checkpoint shows which checkpoint generalises best. 0: none."),
    Setting("data.keep_tokens", "Tags kept in front", "With shuffled tags: the first N tags (the trigger, say) stay "
                                                      "where they are."),
    Setting("lora.rank", "Adapter size (rank)", "How much the LoRA can hold. 4-16 is plenty for one subject; "
                                                "higher makes bigger files that learn more."),
    Setting("textual_inversion.vectors", "Vectors per word", "How many token vectors the trigger stands for: more "
                                                             "hold more detail and need more steps."),
    Setting("train.checkpoint_every", "Checkpoint every N steps", "Resumable saves. Cancelling saves one too; a "
                                                                  "resumed job continues from the latest. 0: only at "
                                                                  "the end."),
    Setting("train.sample_every", "Preview pictures every N steps", "Validation pictures shown on the Jobs page "
                                                                     "while training. 0: only at the end."),
    Setting("train.seed", "Seed", "The same seed and settings give the same result."),
    Setting("train.optimizer", "Optimizer", "adamw: the standard. adamw8bit: same results, much less GPU memory. "
                                            "prodigy: finds its own learning rate (set the learning rate to 1)."),
    Setting("train.mixed_precision", "Precision", "auto: half precision on a GPU (faster, half the memory), full "
                                                  "precision on a CPU."),
    Setting("data.buckets", "Keep each picture's shape (buckets)", "Wide and tall pictures train whole, in buckets "
            "of equal area, instead of being cropped to a square."),
    Setting("data.shuffle_tags", "Shuffle tags", "For tag captions ('sks, red hair, smiling'): the tags are "
                                                 "shuffled at every step, so no tag's position is learned."),
    Setting("data.masked_loss", "Learn only the masked part", "Each picture's mask (its transparency, or "
            "<name>.mask.png beside it) says what to learn; the rest (a background, say) is ignored."),
    Setting("sample.at_checkpoints", "Preview at every checkpoint", "The same prompts and seeds at every "
            "checkpoint: the Jobs page shows them side by side to pick the best checkpoint."),
    Setting("data.hue_jitter", "Vary the colours (hue jitter)", "Turns each picture's colours round the colour "
            "wheel at random (grays stay gray), so the model learns the subject's colour less. It does not make "
            "'a blue sks' recolour the subject (measured: QUALITY.md). 1: any colour; 0: off. Leave off when the "
            "colour is part of who the subject is (a brand character, a product)."),
    Setting("data.flip", "Mirror pictures at random", "Doubles the variety; leave off when the subject is not "
                                                      "symmetric (text, logos, a parting in the hair)."),
    Setting("lora.train_text_encoder", "Also train the text encoder", "Learns the trigger word better; uses more "
                                                                      "memory and overfits sooner."),
    Setting("prior.enabled", "Keep the class general (prior preservation)", "Also trains on pictures of the class "
            "(e.g. other dogs), so that the class word alone still means any dog."),
    Setting("prior.output_preservation", "Leave other prompts alone (output preservation)", "Each step also "
            "shows the model your pictures captioned without the trigger and asks it to draw what it drew before "
            "training (the adapter switched off), so prompts without the trigger keep their meaning. 1 is a good "
            "start; 0: off. Adapters only (LoRA, LyCORIS)."),
    Setting("train.strategy", "Split the model across GPUs", "With several GPUs (jobs submit --gpus N): ddp gives "
            "each GPU the whole model; shard_grad_op splits gradients and optimizer state; full_shard also splits "
            "the weights: the least memory per GPU. The memory estimate shows each.", full_finetunes_only=True),
    Setting("train.compile", "Compile the model's blocks (faster steps)", "blocks: the first step compiles the "
            "UNet's repeated blocks (a minute or so), the steps after it run faster. Worth it for long runs; off "
            "for short ones."),
    Setting("train.channels_last", "Channels-last weights (faster convolutions)", "Keeps the model's weights in "
            "the memory layout that fast convolution kernels read best. Same results; turn off only to compare."),
    Setting("train.gradient_checkpointing", "Save memory by recomputing", "About 25% slower, much less GPU memory: "
                                                                          "turn on when training runs out of memory."),
]


def _method_of(text: str) -> str:
    return tomllib.loads(text).get("method", DEFAULT_METHOD)


def saved_recipes_dir(home: Path) -> Path:
    return Path(home) / SAVED_RECIPES


def recipe_choices(home: Path, method: str) -> list[RecipeChoice]:
    """Built-ins, then the home's saved recipes, of one method; the method's defaults if it has none."""
    choices = [RecipeChoice(f"{name} (built-in)", builtin_text(name), _method_of(builtin_text(name)))
               for name in builtin_names()]
    folder = saved_recipes_dir(home)
    for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
        try:
            choices.append(RecipeChoice(f"{path.stem} (saved)", path.read_text(), _method_of(path.read_text())))
        except (OSError, tomllib.TOMLDecodeError):  # a hand-edited file gone bad: not offered
            continue
    choices = [c for c in choices if c.method == method]
    if not choices:
        choices = [RecipeChoice(f"{method} defaults", dump_recipe(Recipe(method=method, name=method)), method)]
    return choices


def default_index(choices: list[RecipeChoice]) -> int:
    """The method's own toy recipe (toy-lora for LoRA): it draws real pictures and trains on a laptop
    CPU; else its tiny one (tiny-lora); else the first on the toy base, then on the tiny base, then the first."""
    toy = METHODS[choices[0].method].toy_recipe if choices[0].method in METHODS else None
    for name in (toy, toy and toy.replace("toy-", "tiny-", 1)):
        index = next((i for i, c in enumerate(choices) if name and c.label == f"{name} (built-in)"), None)
        if index is not None:
            return index
    bases = [tomllib.loads(c.text).get("base", {}).get("model", BaseSection().model) for c in choices]
    return next((bases.index(b) for b in (DEFAULT_BASE, FALLBACK_BASE) if b in bases), 0)


def job_choice(job_id: int, text: str) -> RecipeChoice:
    return RecipeChoice(f"job {job_id}'s recipe (re-run with edits)", text, _method_of(text))


def build_recipe(choice: RecipeChoice, values: dict) -> Recipe:
    """The choice's recipe with the page's values ({dotted.key: value}); RecipeError names a bad key."""
    return validate(apply_overrides(tomllib.loads(choice.text), [], values), f"'{choice.label}'")


def predicted_memory(recipe_toml: str) -> tuple[float, str] | None:
    """(peak GiB, where it goes) of training on a CUDA GPU, or None where no estimate exists: the
    estimate reads the base's architecture locally, so e.g. a hub id has none."""
    try:
        found = estimate(validate(tomllib.loads(recipe_toml), "the page's recipe"))
    except DreamloomError:
        return None
    return found.total / GiB, found.format()


def recipe_value(recipe: Recipe, key: str):
    node = recipe
    for part in key.split("."):
        node = getattr(node, part, None)
    return node


def setting_choices(key: str) -> list[str] | None:
    """The allowed values of a setting that is a choice (e.g. the optimizer), else None."""
    section, name = key.split(".")
    annotation = Recipe.model_fields[section].annotation  # e.g. LoraSection | None
    section_type = next(t for t in typing.get_args(annotation) or (annotation,) if t is not type(None))
    annotation = section_type.model_fields[name].annotation
    return list(typing.get_args(annotation)) if typing.get_origin(annotation) is typing.Literal else None


def save_recipe(home: Path, recipe: Recipe, name: str) -> Path:
    """Save under the home's saved recipes; never replaces one (a user's work is never lost)."""
    clean = clean_name(name, fallback="").removesuffix(".toml")
    if not clean:
        raise RecipeError("Give the recipe a name.")
    path = saved_recipes_dir(home) / f"{clean}.toml"
    if path.exists():
        raise RecipeError(f"A saved recipe named '{clean}' exists already; pick another name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_recipe(recipe.model_copy(update={"name": clean})))
    return path


def import_recipe(home: Path, file_name: str, data: bytes) -> Path:
    """An uploaded recipe TOML, checked in full before anything is saved."""
    try:
        text = data.decode("utf-8-sig")
        raw = tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"{file_name} is not a TOML recipe: {exc}") from None
    recipe = validate(raw, f"'{file_name}'")
    return save_recipe(home, recipe, Path(file_name).stem)
