"""`dreamloom sample` as one request: what to load (a base with adapter files, or a training run's
exports at a checkpoint), what to draw (prompts, seeds, sampler, size, img2img / inpainting, hires
fix, ControlNet) and, for an X/Y plot, which two settings vary. Every input is checked before a
model loads; the CLI, the studio (through the worker) and tests all go through `draw_request`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import DreamloomError
from .images import Hires, generate, make_grid
from .xy import Axis, labelled_grid


@dataclass
class Request:
    prompts: list[str]
    base: str | None = None  # default: the run's base, else "tiny"
    run: str | None = None  # a training run: its exports (latest, or at `step`) on its base
    step: int | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)
    hypernetworks: list[tuple[str, float]] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    negative: str = ""
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    n: int = 1
    batch: int | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    clip_skip: int | None = None
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float = 0.75  # img2img's denoising strength
    adapter_strength: float | None = None  # every adapter file at this strength (None: each file's own)
    hires: Hires | None = None
    controlnet: str | None = None
    control_image: Image.Image | None = None
    control_scale: float = 1.0
    x: Axis | None = None
    y: Axis | None = None

    @property
    def model_name(self) -> str:
        return Path(self.run).name if self.run else Path(self.base or "tiny").stem


MASK_NEEDS_PICTURE = "--mask says which part of --init-image to re-draw; pass --init-image PICTURE too."


def check_request(r: Request) -> None:
    """Every combination that cannot work, refused before a model loads."""
    if r.mask is not None and r.init_image is None:
        raise DreamloomError(MASK_NEEDS_PICTURE)
    if r.mask is not None and r.mask.size != r.init_image.size:
        raise DreamloomError(f"--mask is {r.mask.width}x{r.mask.height} px but --init-image is {r.init_image.width}x"
                             f"{r.init_image.height}; draw the mask on the picture itself (same size).")
    if r.init_image is not None and 0 < r.steps * r.strength < 1:
        raise DreamloomError(f"--strength {r.strength:g} of --steps {r.steps} re-draws no step at all; raise either "
                             "(img2img runs strength x steps of them), or give 0 to keep the picture.")
    if r.hires is not None and r.init_image is not None:
        raise DreamloomError("--hires is the text-to-image hires fix; for img2img pass a larger --width/--height instead.")
    if (r.controlnet is None) != (r.control_image is None):
        raise DreamloomError("--controlnet and --control-image go together: the ControlNet and the picture it follows.")
    if r.run and (r.loras or r.hypernetworks or r.base):
        raise DreamloomError("--run samples a run's own exports on its own base; leave out --base/--lora/--hypernetwork "
                             "(or sample the exported files with --base and --lora).")
    if r.step is not None and not r.run:
        raise DreamloomError("--step picks a checkpoint of --run RUN; pass the run too.")
    axes = [a for a in (r.x, r.y) if a]
    if len({a.name for a in axes}) < len(axes):
        raise DreamloomError(f"--x and --y both vary {axes[0].name}; vary two different settings.")
    for axis in axes:
        if axis.name == "step" and not r.run:
            raise DreamloomError("an X/Y axis over step needs --run RUN (the checkpoints of that run).")
        if axis.name == "strength" and not (r.run or r.loras or r.hypernetworks):
            raise DreamloomError("an X/Y axis over strength varies --lora/--hypernetwork files (or --run's exports); "
                                 "pass one.")
        if axis.name == "prompt" and not any(axis.values[0] in p for p in r.prompts):
            raise DreamloomError(f"prompt axis: '{axis.values[0]}' (its first value, the text to replace) is in no "
                                 "--prompt; start the list with words of the prompt.")
    if r.run:
        _check_run_steps(r)


def _check_run_steps(r: Request) -> None:
    from ..rundir import RunDir

    run = RunDir.open(r.run)
    wanted = [r.step] if r.step is not None else []
    wanted += (r.x.values if r.x and r.x.name == "step" else []) + (r.y.values if r.y and r.y.name == "step" else [])
    have = sorted(set(run.checkpoint_steps()) | set(run.exported_steps()))
    missing = [s for s in wanted if s not in have]
    if missing:
        raise DreamloomError(f"run '{run.path}' has no checkpoint at step {', '.join(map(str, missing))}; it has "
                             f"{', '.join(map(str, have)) or 'none'}.")


class Models:
    """The model a cell is drawn with, loaded once per (checkpoint step, adapter strength) and kept
    while the next cell needs the same one."""

    def __init__(self, request: Request):
        self.r, self.key, self.loaded, self.base, self.undo = request, None, None, None, None

    def get(self, step: int | None, strength: float | None):
        if (step, strength) != self.key:
            self.release()
            self.loaded = self._load(step, strength)
            self.key = (step, strength)
            self.scheduler = self.loaded[1].scheduler
        base, pipe = self.loaded
        pipe.scheduler = self.scheduler  # a cell's sampler never leaks into the next cell
        return base, pipe

    def release(self) -> None:
        if self.undo:
            self.undo()
        self.undo = self.loaded = None

    def _load(self, step, strength):
        from .embeddings import attach_embeddings

        if self.r.run:
            base, pipe = run_model(self.r.run, step, 1.0 if strength is None else strength)
        else:
            from ..models import load_base
            from .hypernetwork import attach_hypernetworks
            from .sampler import attach_loras

            self.base = base = self.base or load_base(self.r.base or "tiny")
            pipe = base.pipeline()
            loras = [(p, s if strength is None else strength) for p, s in self.r.loras]
            hypernetworks = [(p, s if strength is None else strength) for p, s in self.r.hypernetworks]
            detach, processors = attach_loras(pipe, base, loras), pipe.unet.attn_processors
            attach_hypernetworks(pipe, base, hypernetworks)

            def undo():
                pipe.unet.set_attn_processor(processors)
                detach()
            self.undo = undo
        attach_embeddings(pipe, base, self.r.embeddings)
        return base, pipe


def run_model(run_path: str, step: int | None, strength: float):
    """(base, pipeline) of a run's exports: the latest, or a checkpoint's (exported into exports/step-N
    the first time it is asked for)."""
    from ..rundir import RunDir
    from ..trainers.registry import get_method
    from ..trainers.run import export_run
    from .runs import load_run_model

    run = RunDir.open(run_path)
    if step is None:
        return load_run_model(run, strength=strength)
    exported = run.checkpoint_exports(step)
    recipe, method = run.recipe(), get_method(run.recipe().method)
    paths = [p for f in method.formats if (p := exported.exports / f.path(recipe)).exists()]
    if step not in run.exported_steps() or not paths:
        paths = export_run(run.path, step=step)
    return load_run_model(exported, paths, strength=strength)


def draw_request(r: Request) -> tuple[Image.Image, list[dict]]:
    """The picture to write (one grid, or an X/Y plot of grids) and each cell's settings."""
    from .schedulers import set_scheduler

    check_request(r)
    models, control = Models(r), None
    if r.controlnet:
        from .controlnet import Control, check_fits, load_controlnet

        control = Control(load_controlnet(r.controlnet), r.control_image, r.control_scale)
    xs, ys = (r.x.values if r.x else [None]), (r.y.values if r.y else [None])
    rows, cells = [], []
    for y in ys:
        row = []
        for x in xs:
            cell = _cell_request(r, {r.x.name: x} if r.x else {}, {r.y.name: y} if r.y else {})
            base, pipe = models.get(cell.step, cell.adapter_strength)
            if control is not None:
                check_fits(control.model, pipe.unet, r.controlnet)
            set_scheduler(pipe, cell.scheduler)
            width, height = picture_size(cell, base)
            images = generate(pipe, cell.prompts, negative_prompt=cell.negative, steps=cell.steps,
                              guidance_scale=cell.guidance, seed=cell.seed, images_per_prompt=cell.n, batch=cell.batch,
                              width=width, height=height, clip_skip=cell.clip_skip, init_image=cell.init_image,
                              mask=cell.mask, strength=cell.strength, hires=cell.hires, control=control)
            row.append(make_grid(images, cols=cell.n))
            cells.append({"request": cell, "images": images, "width": width, "height": height, "x": x, "y": y})
        rows.append(row)
    models.release()
    picture = labelled_grid(rows, r.x, r.y) if (r.x or r.y) else rows[0][0]
    return picture, cells


def _cell_request(r: Request, *overrides: dict) -> Request:
    """The request with one X/Y cell's values put in."""
    values = {k: v for o in overrides for k, v in o.items()}
    fields = {"cfg": "guidance", "strength": "adapter_strength", "step": "step", "seed": "seed", "steps": "steps",
              "scheduler": "scheduler", "clip_skip": "clip_skip"}
    cell = dataclasses.replace(r, **{fields[k]: v for k, v in values.items() if k in fields})
    if "prompt" in values:  # Prompt S/R: the axis's first value is the text each value replaces
        search = next(a.values[0] for a in (r.x, r.y) if a and a.name == "prompt")
        cell.prompts = [p.replace(search, values["prompt"], 1) for p in r.prompts]
    return cell


def picture_size(r: Request, base) -> tuple[int, int]:
    """The size the base was trained at (1024 for SDXL, 512 for SD 1.5), or the init picture's, in 8 px cells."""
    image = r.init_image
    default = (image.width // 8 * 8, image.height // 8 * 8) if image else (base.arch.resolution,) * 2
    return r.width or default[0], r.height or default[1]


def picture_records(cells: list[dict], r: Request) -> list[dict]:
    """Every picture drawn, in order: its prompt, negative prompt, seed, A1111 fields and X/Y values."""
    from .pnginfo import picture_fields

    records = []
    for cell in cells:
        c = cell["request"]
        axes = {a.name: v for a, v in ((r.x, cell.get("x")), (r.y, cell.get("y"))) if a}
        for prompt in c.prompts:
            for j in range(c.n):
                fields = picture_fields(c, seed=c.seed + j, width=cell["width"], height=cell["height"])
                records.append({"prompt": prompt, "negative": c.negative, "seed": c.seed + j, "fields": fields,
                                **({"axes": axes} if axes else {})})
    return records


def write_sample(out: Path, picture: Image.Image, cells: list[dict], r: Request, each: bool = False) -> list[Path]:
    """The picture at `out` with its settings in its PNG text; with `each`, every picture also on its
    own beside it (<out>-00001.png, ...), each with its own seed in its parameters, as A1111 saves them."""
    from ..atomic import atomic_path
    from .pnginfo import parameters_text, png_info

    records = picture_records(cells, r)
    kind = Image.registered_extensions()[out.suffix.lower()]
    axes = {a.name: a.values for a in (r.x, r.y) if a}
    written = [out]
    with atomic_path(out) as tmp:
        picture.save(tmp, format=kind, **({"pnginfo": png_info(records, r.n, axes)} if kind == "PNG" else {}))
    if each:
        from PIL.PngImagePlugin import PngInfo

        images = [image for cell in cells for image in cell["images"]]
        for i, (image, record) in enumerate(zip(images, records), start=1):
            path = out.with_name(f"{out.stem}-{i:05d}.png")
            info = PngInfo()
            info.add_text("parameters", parameters_text(record["prompt"], record["negative"], record["fields"]))
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG", pnginfo=info)
            written.append(path)
    return written
