"""Uploaded files into a dataset folder, safely: every upload is checked first, and on any
problem nothing at all is written, so a refused upload never leaves a half-added dataset.

Checks: count and size limits; only real images (the bytes are decoded, the suffix alone proves
nothing) in the formats training reads; zip archives without absolute paths, `..`, links,
encryption, or a declared size or compression ratio that marks a zip bomb; sanitised names.
"""

from __future__ import annotations

import io
import os
import re
import stat
import unicodedata
import zipfile
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from ..atomic import atomic_path
from ..datasets import SUPPORTED_SUFFIXES
from ..datasets.images import open_oriented
from ..errors import DatasetError

MB = 1024 * 1024
# PIL's format name -> the suffixes that name it; the first is used when a file is misnamed.
FORMAT_SUFFIXES = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "WEBP": (".webp",), "BMP": (".bmp",)}
CAPTION_SUFFIX = ".txt"
MAX_CAPTION_BYTES = 64 * 1024


@dataclass(frozen=True)
class UploadLimits:
    max_files: int = 200  # images added by one upload, zips included
    max_image_bytes: int = 25 * MB
    max_pixels: int = 40_000_000  # e.g. 8000 x 5000; larger is a decompression bomb, not a photo
    max_zip_bytes: int = 200 * MB
    max_unzipped_bytes: int = 600 * MB
    max_zip_ratio: float = 100.0  # photos barely compress; a bomb compresses thousands of times


LIMITS = UploadLimits()


@dataclass(frozen=True)
class Accepted:
    name: str  # sanitised file name, suffix matching the real format
    data: bytes
    caption: str | None = None  # from a same-name .txt in a zip


def clean_name(name: str, fallback: str = "image") -> str:
    """A safe file or folder name: no folders, no leading dot, letters/digits/-/_ and one suffix."""
    base = unicodedata.normalize("NFC", PurePosixPath(name.replace("\\", "/")).name)
    stem, suffix = os.path.splitext(base)
    stem = re.sub(r"[^\w\-]+", "-", stem).strip("-_")[:100] or fallback
    return stem + re.sub(r"[^\w.]+", "", suffix.lower()) if stem else ""


def _fixed_suffix(name: str, fmt: str) -> str:
    stem, suffix = os.path.splitext(clean_name(name))
    suffixes = FORMAT_SUFFIXES[fmt]
    return stem + (suffix.lower() if suffix.lower() in suffixes else suffixes[0])


def check_image(name: str, data: bytes, limits: UploadLimits = LIMITS) -> Accepted:
    """The upload as an accepted image, or DatasetError saying what is wrong with it."""
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DatasetError(f"{name}: not an accepted image type; use {', '.join(SUPPORTED_SUFFIXES)} (or a .zip of them)")
    if len(data) > limits.max_image_bytes:
        raise DatasetError(f"{name}: {len(data) / MB:.1f} MB; an image may be at most {limits.max_image_bytes // MB} MB")
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads only the header: format and size
            fmt, (width, height) = img.format, img.size
    except Image.DecompressionBombError:
        raise DatasetError(f"{name}: far too many pixels; an image may have at most {limits.max_pixels:,}") from None
    except Exception:  # PIL raises many types for files that are not images
        raise DatasetError(f"{name}: not a readable image (another kind of file, or corrupt)") from None
    if fmt not in FORMAT_SUFFIXES:
        raise DatasetError(f"{name}: a {fmt} image; accepted formats: {', '.join(FORMAT_SUFFIXES)}")
    if width * height > limits.max_pixels:
        raise DatasetError(f"{name}: {width}x{height} px; an image may have at most {limits.max_pixels:,} pixels")
    try:
        open_oriented(io.BytesIO(data))  # decode every pixel: catches truncated files
    except Exception as exc:
        raise DatasetError(f"{name}: a corrupt or truncated image ({exc})") from None
    return Accepted(_fixed_suffix(name, fmt), data)


def _unsafe_member(name: str) -> bool:
    posix = name.replace("\\", "/")
    return posix.startswith("/") or bool(re.match(r"^[A-Za-z]:", posix)) or ".." in PurePosixPath(posix).parts


def _is_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _is_os_metadata(name: str) -> bool:
    """macOS and Windows add these to zips they make; they are nobody's pictures."""
    parts = PurePosixPath(name.replace("\\", "/")).parts or ("",)
    return "__MACOSX" in parts or parts[-1].startswith(".") or parts[-1].lower() == "thumbs.db"


def zip_members(name: str, data: bytes, limits: UploadLimits = LIMITS) -> list[Accepted]:
    """The images (with their .txt captions) of a zip; DatasetError listing every problem found."""
    if len(data) > limits.max_zip_bytes:
        raise DatasetError(f"{name}: {len(data) / MB:.1f} MB; a zip may be at most {limits.max_zip_bytes // MB} MB")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise DatasetError(f"{name}: not a readable zip archive") from None
    infos = [i for i in archive.infolist() if not i.is_dir() and not _is_os_metadata(i.filename)]
    problems = [f"{name}: '{i.filename}' points outside the dataset (absolute path or '..')"
                for i in archive.infolist() if _unsafe_member(i.filename)]
    problems += [f"{name}: '{i.filename}' is a link; links are not extracted" for i in infos if _is_link(i)]
    problems += [f"{name}: '{i.filename}' is encrypted" for i in infos if i.flag_bits & 0x1]
    total = sum(i.file_size for i in infos)
    if total > limits.max_unzipped_bytes:
        problems.append(f"{name}: unpacks to {total / MB:.0f} MB; at most {limits.max_unzipped_bytes // MB} MB")
    problems += [f"{name}: '{i.filename}' compresses {i.file_size / max(i.compress_size, 1):.0f} times; "
                 "that is a zip bomb, not a photo" for i in infos
                 if i.file_size > MB and i.file_size > limits.max_zip_ratio * max(i.compress_size, 1)]
    if len(infos) > 2 * limits.max_files:  # images plus one caption each
        problems.append(f"{name}: {len(infos)} files; at most {limits.max_files} images per upload")
    if problems:
        raise DatasetError("\n".join(problems))

    images, captions = [], {}
    for info in infos:
        stem, suffix = os.path.splitext(info.filename.replace("\\", "/"))
        try:
            with archive.open(info) as member:  # read no more than the header declares (and we allowed)
                content = member.read(info.file_size + 1)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            problems.append(f"{name}: '{info.filename}' is damaged ({exc}); the zip is corrupt (an interrupted "
                            "download or copy?): make or download it again")
            continue
        if suffix.lower() == CAPTION_SUFFIX and info.file_size <= MAX_CAPTION_BYTES:
            captions[stem] = content
            continue
        try:
            images.append((stem, check_image(info.filename, content, limits)))
        except DatasetError as exc:
            problems.append(f"{name}: {exc}")
    orphans = set(captions) - {stem for stem, _ in images}
    problems += [f"{name}: '{stem}{CAPTION_SUFFIX}' is not the caption of an image in the zip" for stem in sorted(orphans)]
    accepted = []
    for stem, image in images:
        caption = captions.get(stem)
        try:
            text = caption.decode("utf-8-sig").strip() if caption is not None else None
        except UnicodeDecodeError:
            problems.append(f"{name}: '{stem}{CAPTION_SUFFIX}' is not UTF-8 text")
            continue
        accepted.append(Accepted(image.name, image.data, text))
    if problems:
        raise DatasetError("\n".join(problems))
    return accepted


def save_uploads(folder: Path, uploads: list[tuple[str, bytes]], limits: UploadLimits = LIMITS) -> list[Path]:
    """Check every (file name, bytes) upload, then write all of them into `folder`, or nothing.
    Names never overwrite: a taken name gets -2, -3, ...; returns the images written."""
    accepted, problems = [], []
    for name, data in uploads:
        try:
            zipped = name.lower().endswith(".zip")  # by name: a zip called photo.png is no image, and refused
            accepted += zip_members(name, data, limits) if zipped else [check_image(name, data, limits)]
        except DatasetError as exc:
            problems.append(str(exc))
    if len(accepted) > limits.max_files:
        problems.append(f"{len(accepted)} images in one upload; at most {limits.max_files}")
    if not problems and not accepted:
        problems.append("no images in the upload")
    if problems:
        raise DatasetError("Nothing was added:\n" + "\n".join(f"  - {p}" for p in problems))
    return _write_all(Path(folder), accepted)


def _write_all(folder: Path, accepted: list[Accepted]) -> list[Path]:
    """All files or none (a full disk adds nothing); a name already taken gets -2, -3, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    taken = {p.stem for p in folder.iterdir()}  # by stem: dog.png and dog.jpg would share dog.txt
    planned: list[tuple[Path, bytes]] = []
    for item in accepted:
        stem, suffix = os.path.splitext(item.name)
        unique, n = stem, 1
        while unique in taken:
            n += 1
            unique = f"{stem}-{n}"
        taken.add(unique)
        planned.append((folder / f"{unique}{suffix}", item.data))
        if item.caption:
            planned.append((folder / f"{unique}{CAPTION_SUFFIX}", item.caption.encode()))
    try:  # temp files (created exclusively, never through a planted link) renamed only once all are written
        with ExitStack() as stack:
            for path, data in planned:
                stack.enter_context(atomic_path(path)).write_bytes(data)
    except OSError as exc:
        raise DatasetError(f"Nothing was added: could not write into {folder} ({exc.strerror or exc}).") from None
    return [path for path, _ in planned if path.suffix != CAPTION_SUFFIX]
