"""Every picture a recipe's [data] names, checked at once: data.path (a plain folder, or kohya's
`<repeats>_<caption>` sub-folders), the [[data.folders]], and the held-out validation pictures."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dreamloom.datasets.scan import METADATA_FILES, SUPPORTED_SUFFIXES, DataItem, load_items
from dreamloom.errors import DatasetError

KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass
class DataSplit:
    train: list[DataItem]
    regularization: list[DataItem] = field(default_factory=list)  # class pictures of the recipe's folders
    validation: list[DataItem] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    path: str
    repeats: int
    class_word: str
    caption_template: str
    caption_prefix: str = ""
    caption_suffix: str = ""
    regularization: bool = False


def kohya_folders(root: Path) -> list[tuple[Path, int, str]] | None:
    """(folder, repeats, caption) of each `<repeats>_<caption>` sub-folder, when `root` holds no
    pictures of its own but sub-folders (kohya's layout); None for an ordinary folder."""
    if not root.is_dir() or any((root / name).is_file() for name in METADATA_FILES):
        return None
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if any(p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES for p in entries):
        return None
    folders = sorted(p for p in entries if p.is_dir())
    if not folders:
        return None
    found = []
    for folder in folders:
        match = KOHYA_FOLDER.match(folder.name)
        if not match or int(match[1]) < 1:
            raise DatasetError(f"folder '{folder.name}' in {root}: sub-folders of a dataset are named "
                               "<repeats>_<caption>, e.g. '10_sks dog' (each picture seen 10 times per epoch, "
                               "captioned 'sks dog' where it has no .txt); rename it")
        found.append((folder, int(match[1]), match[2]))
    return found


def sources(recipe) -> list[Source]:
    """The folders of a recipe's [data], each with its own repeats and captions. Regularization
    folders are class pictures: captioned like prior preservation's, never with the trigger."""
    d, found = recipe.data, []
    if d.path:
        nested = kohya_folders(Path(d.path).expanduser())
        if nested is None:
            found.append(Source(d.path, d.repeats, d.class_word, d.caption_template, d.caption_prefix,
                                d.caption_suffix))
        for folder, repeats, caption in nested or []:
            found.append(Source(str(folder), repeats * d.repeats, d.class_word, caption, d.caption_prefix,
                                d.caption_suffix))
    for f in d.folders:
        shared = ("", "") if f.regularization else (d.caption_prefix, d.caption_suffix)
        template = recipe.prior.class_prompt if f.regularization else d.caption_template
        found.append(Source(f.path, f.repeats, _unless_none(f.class_word, d.class_word), f.caption_template or template,
                            _unless_none(f.caption_prefix, shared[0]),
                            _unless_none(f.caption_suffix, shared[1]), f.regularization))
    return found


def _unless_none(value, default):
    """A folder's own setting, where it has one ('' included: it clears the shared one)."""
    return default if value is None else value


def recipe_data(recipe) -> DataSplit:
    """Every picture of the recipe, decoded and checked; all problems reported at once per folder."""
    d = recipe.data

    def load(source: Source) -> list[DataItem]:
        return load_items(source.path, trigger=d.trigger, class_word=source.class_word,
                          caption_template=source.caption_template, min_image_size=d.min_image_size,
                          repeats=source.repeats, caption_prefix=source.caption_prefix,
                          caption_suffix=source.caption_suffix, masks=d.masked_loss)

    split = DataSplit([])
    for source in sources(recipe):
        (split.regularization if source.regularization else split.train).extend(load(source))
    if not split.train:
        raise DatasetError("no training pictures: every folder of [[data.folders]] is a regularization folder; "
                           "set data.path to the subject's pictures")
    if d.validation_path:
        split.validation = load(Source(d.validation_path, 1, d.class_word, d.caption_template, d.caption_prefix,
                                       d.caption_suffix))
    elif d.validation_split:
        held = max(1, round(len(split.train) * d.validation_split))
        if held >= len(split.train):
            raise DatasetError(f"data.validation_split = {d.validation_split:g} holds out {held} of the "
                               f"{len(split.train)} training pictures, leaving none to train on; lower it, "
                               "add pictures, or give data.validation_path")
        order = torch.randperm(len(split.train), generator=torch.Generator().manual_seed(recipe.train.seed)).tolist()
        split.validation = [split.train[i] for i in sorted(order[:held])]
        split.train = [split.train[i] for i in sorted(order[held:])]
    return split
