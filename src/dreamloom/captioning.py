"""`dreamloom caption`: write the `.txt` caption beside every picture of a dataset with a captioner
that transformers loads from a local folder (or the local hub cache, never the network).

Two kinds of captioner: one that writes a sentence (BLIP, Florence-2, or any image-text-to-text
model such as Qwen2-VL or a LLaVA), and a WD14-style tagger (an image classifier with one label
per tag, read multi-label: every tag above a threshold). A caption a user already has is never
replaced unless they ask (--overwrite).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .atomic import atomic_write
from .datasets.images import open_oriented, to_rgb
from .datasets.scan import SUPPORTED_SUFFIXES, is_picture
from .datasets.sources import kohya_folders
from .errors import DreamloomError

MODES = ("caption", "tags")
# Model types that write captions through their own classes; any other image-text-to-text model
# (Qwen2-VL, LLaVA, ...) goes through AutoModelForImageTextToText with a chat prompt.
FLORENCE_TASK = "<DETAILED_CAPTION>"
CHAT_PROMPT = "Describe this picture in one sentence, as a caption for training an image model."


@dataclass
class Captioner:
    describe: Callable  # PIL image -> caption text
    name: str


def model_folder(model: str) -> Path:
    """A local folder, or the folder of a hub id in the local cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or "/" not in model or model.count("/") > 1:
        raise DreamloomError(f"captioner '{model}' is not a model folder; pass a folder with a config.json "
                             "(or a hub id you have downloaded before)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not in the cache: huggingface_hub raises several types
        raise DreamloomError(f"captioner '{model}' is neither a folder nor in the local hub cache (nothing is "
                             f"downloaded here); download it first, e.g. `hf download {model}`, or pass its "
                             "folder") from None


def load_captioner(model: str, mode: str = "caption", threshold: float = 0.35, max_tokens: int = 60) -> Captioner:
    folder = model_folder(model)
    config_path = folder / "config.json"
    try:
        model_type = json.loads(config_path.read_text())["model_type"]
    except (OSError, ValueError, KeyError):
        raise DreamloomError(f"'{folder}' is not a captioner: it has no readable config.json with a model_type; "
                             "pass a BLIP, Florence-2, Qwen2-VL/LLaVA or WD14-style tagger folder") from None
    import transformers

    try:
        if mode == "tags":
            return _tagger(folder, model_type, threshold)
        return _sentences(folder, model_type, max_tokens)
    except (ValueError, OSError, KeyError, TypeError) as exc:  # transformers: "Unrecognized configuration class..."
        what = "an image-classification tagger (WD14-style)" if mode == "tags" else \
            "BLIP, Florence-2 or an image-text-to-text model (Qwen2-VL, LLaVA)"
        raise DreamloomError(f"'{folder}' is not a captioner for --mode {mode}: its model_type '{model_type}' "
                             f"does not load as {what} with transformers {transformers.__version__} "
                             f"({str(exc).splitlines()[0][:160]})") from None


def _sentences(folder: Path, model_type: str, max_tokens: int) -> Captioner:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    if model_type == "blip":
        from transformers import BlipForConditionalGeneration

        net = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
        prompt = None
    else:
        net = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
        prompt = FLORENCE_TASK if model_type == "florence2" else _chat(processor)

    @torch.no_grad()
    def describe(image) -> str:
        inputs = processor(images=image, text=prompt, return_tensors="pt") if prompt else \
            processor(images=image, return_tensors="pt")
        out = net.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        if prompt and "input_ids" in inputs and model_type != "florence2":
            out = out[:, inputs["input_ids"].shape[1]:]  # chat models repeat the prompt
        text = processor.batch_decode(out, skip_special_tokens=True)[0]
        return " ".join(text.replace(FLORENCE_TASK, "").split())
    return Captioner(describe, f"{model_type} ({folder.name})")


def _chat(processor) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CHAT_PROMPT}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _tagger(folder: Path, model_type: str, threshold: float) -> Captioner:
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    net = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True).eval()
    labels = [net.config.id2label[i] for i in range(len(net.config.id2label))]
    tags_csv = folder / "selected_tags.csv"  # WD14 taggers ship their tag names so
    if tags_csv.is_file():
        rows = [line.split(",") for line in tags_csv.read_text().splitlines()[1:] if line.strip()]
        labels = [row[1] for row in rows] if len(rows) == len(labels) else labels

    @torch.no_grad()
    def describe(image) -> str:
        scores = torch.sigmoid(net(**processor(images=image, return_tensors="pt")).logits[0])
        chosen = [i for i in scores.argsort(descending=True).tolist() if scores[i] >= threshold]
        return ", ".join(labels[i].replace("_", " ") for i in chosen)
    return Captioner(describe, f"{model_type} tagger ({folder.name})")


def pictures(folder: Path) -> list[Path]:
    """The pictures a dataset trains on: the folder's own, or those of its kohya sub-folders."""
    if not folder.is_dir():
        raise DreamloomError(f"dataset folder '{folder}' does not exist; pass the folder of pictures to caption")
    folders = [f for f, _, _ in kohya_folders(folder) or []] or [folder]
    return sorted(p for f in folders for p in f.iterdir() if is_picture(p))


def caption_dataset(folder: str | Path, captioner: Captioner, *, prefix: str = "", suffix: str = "",
                    overwrite: bool = False, progress=None) -> tuple[int, int, list[str]]:
    """Write `<stem>.txt` beside every picture; (written, kept because a caption existed, pictures
    left without one: unreadable, or the model wrote nothing for them; the others are captioned all
    the same). An empty result never replaces a caption."""
    found = pictures(Path(folder).expanduser())
    if not found:
        raise DreamloomError(f"no pictures in '{folder}' ({', '.join(SUPPORTED_SUFFIXES)})")
    written, kept, unreadable = 0, 0, []
    for path in progress(found) if progress else found:
        sidecar = path.with_suffix(".txt")
        if sidecar.exists() and not overwrite:
            kept += 1
            continue
        try:
            picture = to_rgb(open_oriented(path))
        except Exception:  # PIL raises many types for broken files
            unreadable.append(f"{path.name} (unreadable)")
            continue
        text = captioner.describe(picture).strip()
        if not text:
            unreadable.append(f"{path.name} (the model wrote nothing)")
            continue
        atomic_write(sidecar, " ".join(f"{prefix} {text} {suffix}".split()) + "\n")
        written += 1
    return written, kept, unreadable
