"""Find, caption and validate the images of a training folder."""

from __future__ import annotations

import codecs
import hashlib
import io
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from dreamloom.captions import fill_placeholders, unknown_placeholders
from dreamloom.datasets.images import open_oriented
from dreamloom.datasets.masks import MASK_SUFFIX, find_mask
from dreamloom.errors import DatasetError

SUPPORTED_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption")


def is_picture(path: Path) -> bool:
    """A training picture of a folder: an image file, not a mask beside one, not a hidden file."""
    return (path.is_file() and path.suffix.lower() in SUPPORTED_SUFFIXES and not path.name.endswith(MASK_SUFFIX)
            and not path.name.startswith("."))


@dataclass(frozen=True)
class DataItem:
    path: Path  # absolute path of the image file
    caption: str  # final caption, placeholders filled in
    width: int  # size after EXIF orientation
    height: int
    sha256: str  # hex digest of the file's bytes (used as cache key)
    repeats: int = 1  # how often it is seen per epoch (its folder's repeats)
    mask: Path | None = None  # where its loss mask is: a <stem>.mask.png, or the picture itself (its alpha)


def load_items(
    folder: str | Path,
    *,
    trigger: str,
    class_word: str,
    caption_template: str = "a photo of {trigger} {class_word}",
    min_image_size: int = 64,
    repeats: int = 1,
    caption_prefix: str = "",
    caption_suffix: str = "",
    masks: bool = False,
) -> list[DataItem]:
    """Read every image of `folder` with its caption, validating all of them first.

    `folder` holds images with optional same-stem `.txt` captions, or is a Hugging Face
    imagefolder (a `metadata.jsonl`/`metadata.csv` with `file_name` and `text`/`caption`).
    `caption_prefix`/`caption_suffix` go around every caption; with `masks`, each picture's
    loss mask (a `<stem>.mask.png` beside it, else its alpha channel) is found and checked.
    Raises one DatasetError that lists every problem found.
    """
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"Dataset folder {root} {what}. Point the recipe at an image folder.")
    if unknown := unknown_placeholders(caption_template):
        raise DatasetError(
            f"caption_template {caption_template!r} is invalid (unknown {', '.join(unknown)}); "
            "it may only use the placeholders {trigger} and {class_word}."
        )
    default_caption = fill_placeholders(caption_template, trigger, class_word)

    metadata = [root / name for name in METADATA_FILES if (root / name).is_file()]
    problems: list[str] = []
    if metadata:
        captioned = _read_metadata(root, metadata[0].name, problems)
    else:
        captioned = _read_sidecars(root, problems)
    if not captioned and not problems:
        raise DatasetError(
            f"No images found in {root}. Supported suffixes: {', '.join(SUPPORTED_SUFFIXES)}."
        )

    items = []
    for path, caption in sorted(captioned):
        name = _display_name(path, root)
        own = fill_placeholders(caption, trigger, class_word) if caption else ""
        caption = fill_placeholders(f"{caption_prefix} {own or default_caption} {caption_suffix}", trigger, class_word)
        item = _inspect(path, name, caption, min_image_size, problems)
        if item is not None:
            item = replace(item, repeats=repeats)
            items.append(replace(item, mask=find_mask(item, name, problems)) if masks else item)
    if problems:
        raise DatasetError(
            f"Found {len(problems)} problem(s) in dataset folder {root}:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nFix, replace or remove these files and run again."
        )
    return items


def _display_name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _read_sidecars(root: Path, problems: list[str]) -> list[tuple[Path, str]]:
    """Images directly in `root`, each with the text of its `<stem>.txt` if any."""
    found = []
    for path in root.iterdir():
        if not is_picture(path):
            continue  # .txt sidecars, masks, .DS_Store, notes, sub-folders...
        sidecar = path.with_suffix(".txt")
        caption = ""
        if sidecar.is_file():
            try:
                caption = sidecar.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(f"{sidecar.name}: caption is not readable UTF-8 text ({exc})")
        found.append((path, caption))
    return found


def _read_metadata(root: Path, meta_name: str, problems: list[str]) -> list[tuple[Path, str]]:
    """Rows of an imagefolder dataset, read through the `datasets` library."""
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    try:
        # A throwaway cache dir: nothing lands in ~/.cache, and edits are never shadowed.
        with _offline_quiet_datasets(), tempfile.TemporaryDirectory() as cache_dir:
            rows = load_dataset(
                "imagefolder", data_dir=str(root), split="train",
                cache_dir=cache_dir, keep_in_memory=True,
            )
    except Exception as exc:  # datasets raises many types for malformed metadata
        problems.append(f"{meta_name}: cannot be read as imagefolder metadata ({exc})")
        return []
    column = next((c for c in CAPTION_COLUMNS if c in rows.column_names), None)
    if column is None:
        others = [c for c in rows.column_names if c != "image"]  # "image" is file_name
        problems.append(
            f"{meta_name}: no caption column; name it 'text' or 'caption' "
            f"(found: {', '.join(others) or 'only file_name'})"
        )
        return []

    found = []
    # decode=False hands back paths, so images are decoded once, by _inspect, not here.
    for row in rows.cast_column("image", ImageFeature(decode=False)):
        path = Path(row["image"]["path"])
        name = _display_name(path, root)
        if not path.is_file():
            problems.append(f"{name}: listed in {meta_name} but the file does not exist")
        elif path.suffix.lower() not in SUPPORTED_SUFFIXES:
            problems.append(
                f"{name}: unsupported suffix; use one of {', '.join(SUPPORTED_SUFFIXES)}"
            )
        else:
            found.append((path, row[column] or ""))
    return found


@contextmanager
def _offline_quiet_datasets():
    """Keep `datasets` off the network (it pings a download counter) and its bars off."""
    import datasets

    was_offline = datasets.config.HF_HUB_OFFLINE
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.config.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline
        if not bars_were_off:
            datasets.enable_progress_bars()


def _inspect(
    path: Path, name: str, caption: str, min_size: int, problems: list[str]
) -> DataItem | None:
    """Decode one image fully; return its item, or record why it cannot be used."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append(f"{name}: cannot be read ({exc.strerror or exc})")
        return None
    try:
        width, height = open_oriented(io.BytesIO(data)).size
    except Exception as exc:  # PIL raises many types for broken files
        if not data:
            problems.append(f"{name}: the file is empty")
        elif _looks_like_text(data):
            problems.append(f"{name}: is a text file, not an image")
        else:
            problems.append(f"{name}: not a readable image, corrupt or truncated ({exc})")
        return None
    if min(width, height) < min_size:
        problems.append(
            f"{name}: too small ({width}x{height} px); the shorter side must be "
            f"at least {min_size} px"
        )
        return None
    return DataItem(path, caption, width, height, hashlib.sha256(data).hexdigest())


def _looks_like_text(data: bytes) -> bool:
    # An incremental decoder tolerates a multi-byte character cut at the 4 KiB mark.
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data[:4096])
    except UnicodeDecodeError:
        return False
    return b"\x00" not in data[:4096]
