"""The studio's datasets: `<home>/datasets/<name>/` folders of images with `.txt` caption sidecars
(the layout `dreamloom train --data` reads) and a `dataset.json` with the trigger and class word."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tempfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..atomic import atomic_write
from ..datasets.scan import is_picture
from ..datasets.images import open_oriented, to_rgb
from ..errors import DatasetError
from ..recipes.sections import DataSection
from .uploads import CAPTION_SUFFIX, clean_name, save_uploads

SETTINGS_FILE = "dataset.json"
MIN_IMAGE_SIZE = DataSection.model_fields["min_image_size"].default  # what a recipe refuses by default
DEMO_DATASET = "demo-crescent"
DEMO_SHAPE = "crescent"  # a shape the toy base never saw: learning it is learning new content


@dataclass(frozen=True)
class DatasetSettings:
    trigger: str = DataSection.model_fields["trigger"].default
    class_word: str = ""


@dataclass(frozen=True)
class ImageEntry:
    path: Path
    width: int
    height: int
    size_bytes: int
    caption: str  # the sidecar's text; empty: training uses the recipe's caption template
    problems: tuple[str, ...]


def datasets_root(home: Path) -> Path:
    return Path(home) / "datasets"


def list_datasets(home: Path) -> list[str]:
    root = datasets_root(home)
    return sorted(p.name for p in root.iterdir() if (p / SETTINGS_FILE).is_file()) if root.is_dir() else []


def create_dataset(home: Path, name: str, settings: DatasetSettings) -> Path:
    clean = clean_name(name, fallback="")
    if not clean:
        raise DatasetError("Give the dataset a name (letters, digits, - or _).")
    folder = datasets_root(home) / clean
    if folder.exists():
        raise DatasetError(f"A dataset named '{folder.name}' already exists; pick another name.")
    folder.mkdir(parents=True)
    write_settings(folder, settings)
    return folder


def add_demo_dataset(home: Path) -> Path:
    """The demo dataset: four toy-world pictures of a crescent, captioned with the background
    ("a {trigger} {class_word} on a white background"), to train toy-lora on with one click. Made as
    an upload is (create_dataset, then save_uploads of a zip), never over an existing dataset."""
    from ..toy.world import GENERIC_WORD, write_subject_folder

    if (datasets_root(home) / DEMO_DATASET).exists():
        raise DatasetError(f"A dataset named '{DEMO_DATASET}' exists already; it was left as it is.")
    archive = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(archive, "w") as zipped:
        for picture in write_subject_folder(tmp, DEMO_SHAPE):
            for path in (picture, caption_path(picture)):
                zipped.write(path, path.name)
    folder = create_dataset(home, DEMO_DATASET, DatasetSettings(class_word=GENERIC_WORD))
    save_uploads(folder, [(f"{DEMO_DATASET}.zip", archive.getvalue())])
    return folder


def read_settings(folder: Path) -> DatasetSettings:
    data = json.loads((folder / SETTINGS_FILE).read_text())
    return DatasetSettings(trigger=data.get("trigger") or DatasetSettings.trigger, class_word=data.get("class_word", ""))


def write_settings(folder: Path, settings: DatasetSettings) -> None:
    trigger = settings.trigger.strip()
    if not trigger or len(trigger.split()) > 1:
        raise DatasetError("The trigger must be one word (e.g. sks): it is the new word that names your subject.")
    text = json.dumps({"trigger": trigger, "class_word": settings.class_word.strip()}, indent=1)
    atomic_write(folder / SETTINGS_FILE, text)


def image_paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_picture(p))


@lru_cache(maxsize=4096)
def _image_facts(path: Path, mtime_ns: int, size: int) -> tuple[int, int, str, str | None]:
    """(width, height, sha256, problem); keyed by mtime and size, so a changed file is read again."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        width, height = open_oriented(io.BytesIO(data)).size
    except Exception:  # PIL raises many types for broken files
        return 0, 0, digest, "unreadable: not an image, or corrupt"
    return width, height, digest, None


def scan_images(folder: Path, min_size: int = MIN_IMAGE_SIZE) -> list[ImageEntry]:
    """Every image with its size, caption and problems (unreadable, too small, duplicate)."""
    entries, first_with_hash = [], {}
    for path in image_paths(folder):
        st = path.stat()
        width, height, digest, problem = _image_facts(path, st.st_mtime_ns, st.st_size)
        problems = [problem] if problem else []
        if not problem and min(width, height) < min_size:
            problems.append(f"too small: the shorter side must be at least {min_size} px")
        if digest in first_with_hash:
            problems.append(f"duplicate of {first_with_hash[digest]}")
        first_with_hash.setdefault(digest, path.name)
        entries.append(ImageEntry(path, width, height, st.st_size, read_caption(path), tuple(problems)))
    return entries


@lru_cache(maxsize=1024)
def _thumbnail(path: Path, mtime_ns: int, size: int) -> bytes | None:
    try:
        img = to_rgb(open_oriented(path))
    except Exception:
        return None
    img.thumbnail((size, size))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


def thumbnail(path: Path, size: int = 256) -> bytes | None:
    """A small JPEG of the image for the grid (photos are megabytes); None when unreadable."""
    return _thumbnail(path, path.stat().st_mtime_ns, size)


def caption_path(image: Path) -> Path:
    return image.with_suffix(CAPTION_SUFFIX)


def read_caption(image: Path) -> str:
    sidecar = caption_path(image)
    try:
        return sidecar.read_text(encoding="utf-8-sig").strip() if sidecar.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return ""


def write_caption(image: Path, text: str) -> None:
    """An empty caption removes the sidecar, so the recipe's caption template applies."""
    text = " ".join(text.split())
    if text:
        caption_path(image).write_text(text + "\n", encoding="utf-8")
    else:
        caption_path(image).unlink(missing_ok=True)


def has_word(caption: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", caption) is not None


def add_trigger(folder: Path, trigger: str) -> int:
    """Put the trigger at the front of every caption that lacks it; returns how many changed.
    Images without a caption are left alone: the caption template already names the trigger; so are
    captions with the {trigger} placeholder, which training fills in."""
    changed = 0
    for image in image_paths(folder):
        caption = read_caption(image)
        if caption and not has_word(caption, trigger) and "{trigger}" not in caption:
            write_caption(image, f"{trigger}, {caption}")
            changed += 1
    return changed


def find_replace(folder: Path, find: str, replace: str) -> int:
    """Replace text in every caption; returns how many captions changed."""
    if not find:
        raise DatasetError("Type the text to find.")
    changed = 0
    for image in image_paths(folder):
        caption = read_caption(image)
        if find in caption:
            write_caption(image, caption.replace(find, replace))
            changed += 1
    return changed


def tag_counts(folder: Path, separator: str = ",") -> list[tuple[str, int]]:
    """Every tag of the captions (comma-separated) with how many captions have it, most used first."""
    counts: dict[str, int] = {}
    for image in image_paths(folder):
        for tag in dict.fromkeys(t.strip() for t in read_caption(image).split(separator) if t.strip()):
            counts[tag] = counts.get(tag, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def remove_tag(folder: Path, tag: str, separator: str = ",") -> int:
    """Take a tag out of every caption that has it; returns how many changed."""
    changed = 0
    for image in image_paths(folder):
        tags = [t.strip() for t in read_caption(image).split(separator) if t.strip()]
        if tag in tags:
            write_caption(image, f"{separator} ".join(t for t in tags if t != tag))
            changed += 1
    return changed


def caption_job(queue, folder: Path, model: str, mode: str, prefix: str, overwrite: bool, by: str | None = None) -> int:
    """Queue `dreamloom caption` for a dataset (a worker runs it: a captioner never loads into the
    studio's process); the model folder is checked first."""
    from ..captioning import model_folder

    if not model.strip():
        raise DatasetError("Give the captioner: a model folder (BLIP, Florence-2, Qwen2-VL, a WD14-style tagger).")
    if not (model_folder(model.strip()) / "config.json").is_file():
        raise DatasetError(f"'{model}' has no config.json: it is not a model folder.")
    arguments = ["caption", str(folder), "--model", model.strip(), "--mode", mode]
    arguments += ["--prefix", prefix] if prefix else []
    arguments += ["--overwrite"] if overwrite else []
    return queue.submit_command(f"caption {folder.name}", arguments, by)


def remove_image(image: Path) -> None:
    image.unlink(missing_ok=True)
    caption_path(image).unlink(missing_ok=True)
