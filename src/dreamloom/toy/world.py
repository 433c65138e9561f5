"""The toy world: 64x64 pictures of one flat shape in one colour on a plain background.

Small enough that a base model pretrains on a laptop CPU, rich enough to measure what the
personalization methods teach (see issue 7 and QUALITY.md). Everything is a function of a seed.

Three kinds of shape, because the methods differ in what they can teach:
- NAMED shapes appear in pretraining with their names ("a red circle on a gray background");
- SUBJECT shapes appear in pretraining only under the generic word ("a red shape on ..."), so
  the base can draw them but no word binds to them: a new word can be bound to them, as with
  real Stable Diffusion and a user's dog;
- UNSEEN shapes never appear in pretraining: learning them is learning new content.
BLOB is the judge's "none of these" class, so that a formless smudge never counts as a subject.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # drawn at 4x and downsampled: anti-aliased edges, as photos have

NAMED = ("circle", "square", "triangle", "cross", "star")
SUBJECT = ("heart", "diamond")
UNSEEN = ("crescent",)
BLOB = "blob"
SHAPES = NAMED + SUBJECT + UNSEEN + (BLOB,)  # the judge's shape classes, in this order
PRETRAIN_SHAPES = NAMED + SUBJECT

COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 30),
    "purple": (140, 45, 190),
    "orange": (250, 135, 20),
}
BACKGROUNDS = {
    "white": (238, 238, 238),
    "black": (22, 22, 22),
    "gray": (128, 128, 128),
    "pink": (245, 175, 195),
}
GENERIC_WORD = "shape"  # the class word every shape is also captioned with
NAMED_CAPTION_SHARE = 0.8  # named shapes: caption with their name this often, else the generic word


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    cx: float  # centre and radius, pixels at 64x64
    cy: float
    radius: float
    jitter: tuple[int, int, int]  # added to the shape colour
    bg_jitter: tuple[int, int, int]
    blob_seed: int = 0

    def caption(self, generic: bool = False) -> str:
        word = GENERIC_WORD if generic or self.shape not in NAMED else self.shape
        return caption(self.colour, word, self.background)


def caption(colour: str | None, word: str, background: str | None) -> str:
    text = f"a {colour} {word}" if colour else f"a {word}"
    return f"{text} on a {background} background" if background else text


def _polygon(shape: str, blob_seed: int) -> list[tuple[float, float]]:
    """The outline in unit coordinates (radius 1 around the origin, y down)."""
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]
    if shape == "cross":
        a, b = 0.32, 0.95
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
                (-b, a), (-b, -a), (-a, -a)]
    if shape == "star":
        return [(r * math.sin(math.pi * k / 5), -r * math.cos(math.pi * k / 5))
                for k, r in zip(range(10), [1.0, 0.42] * 5)]
    if shape == "heart":
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 16.5, -y / 16.5 - 0.1))
        return pts
    if shape == BLOB:  # a lumpy outline: low harmonics with large random amplitudes
        rng = np.random.default_rng(blob_seed)
        amps, phases = rng.uniform(0.12, 0.3, 3), rng.uniform(0, 2 * math.pi, 3)
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            r = 0.8 + sum(a * math.sin((h + 2) * t + p) for h, (a, p) in enumerate(zip(amps, phases)))
            pts.append((r * math.cos(t), r * math.sin(t)))
        return pts
    raise ValueError(shape)


def render(scene: Scene) -> Image.Image:
    s = SUPERSAMPLE
    bg = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(BACKGROUNDS[scene.background], scene.bg_jitter))
    fg = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[scene.colour], scene.jitter))
    img = Image.new("RGB", (SIZE * s, SIZE * s), bg)
    draw = ImageDraw.Draw(img)
    cx, cy, r = scene.cx * s, scene.cy * s, scene.radius * s
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif scene.shape == "crescent":  # a disc with an offset disc of background cut out of it
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        ox, rr = cx + 0.45 * r, 0.8 * r
        draw.ellipse([ox - rr, cy - 0.15 * r - rr, ox + rr, cy - 0.15 * r + rr], fill=bg)
    else:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in _polygon(scene.shape, scene.blob_seed)], fill=fg)
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def random_scene(rng: np.random.Generator, shape: str | None = None, colour: str | None = None,
                 background: str | None = None, shapes: tuple[str, ...] = PRETRAIN_SHAPES) -> Scene:
    """One scene; any attribute not given is drawn at random."""
    shape = shape or str(rng.choice(shapes))
    colour = colour or str(rng.choice(list(COLOURS)))
    background = background or str(rng.choice(list(BACKGROUNDS)))
    radius = float(rng.uniform(11, 24))
    cx, cy = (float(rng.uniform(radius + 2, SIZE - radius - 2)) for _ in range(2))
    jitter = tuple(int(v) for v in rng.integers(-14, 15, 3))
    bg_jitter = tuple(int(v) for v in rng.integers(-8, 9, 3))
    return Scene(shape, colour, background, cx, cy, radius, jitter, bg_jitter, int(rng.integers(2**31)))


def pretraining_example(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """An image and its pretraining caption: subject shapes only ever under the generic word."""
    scene = random_scene(rng)
    generic = scene.shape in SUBJECT or rng.random() > NAMED_CAPTION_SHARE
    return render(scene), scene.caption(generic=generic)


def subject_images(shape: str, count: int = 4, seed: int = 0, colour: str = "orange",
                   backgrounds: tuple[str, ...] = ("white", "gray")) -> list[Image.Image]:
    """A user's few photos of their subject: one shape in one colour, a couple of backgrounds."""
    rng = np.random.default_rng(seed)
    return [render(random_scene(rng, shape, colour, backgrounds[i % len(backgrounds)])) for i in range(count)]


def write_subject_folder(folder, shape: str, count: int = 4, seed: int = 0, colour: str = "orange",
                         backgrounds: tuple[str, ...] = ("white", "gray"), name_colour: bool = False) -> list:
    """Write the subject pictures with captions that name the background, as a careful user captions
    ("a {trigger} {class_word} on a white background": the trigger is filled in at training time), and with
    `name_colour` its colour too ("a orange {trigger} ...", so that the trigger need not carry the colour);
    existing files are never overwritten. Returns the picture paths."""
    from pathlib import Path

    from ..errors import DreamloomError

    if shape not in SHAPES or shape == BLOB:
        raise DreamloomError(f"unknown shape '{shape}'; the toy world has {', '.join(SHAPES[:-1])}.")
    if colour not in COLOURS or any(b not in BACKGROUNDS for b in backgrounds):
        raise DreamloomError(f"colours are {', '.join(COLOURS)}; backgrounds are {', '.join(BACKGROUNDS)}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(subject_images(shape, count, seed, colour, backgrounds)):
        path = folder / f"{shape}-{i}.png"
        if not path.exists() and not path.with_suffix(".txt").exists():
            img.save(path)
            path.with_suffix(".txt").write_text(
                caption(colour if name_colour else None, "{trigger} {class_word}", backgrounds[i % len(backgrounds)]))
        paths.append(path)
    return paths
