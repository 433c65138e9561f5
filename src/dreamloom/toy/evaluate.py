"""`dreamloom eval`: how well a run on the toy base learned its subject, in the DreamBooth paper's
terms, judged by the toy world's judge (dreamloom.toy.judge).

Every metric is a share of generated pictures (fixed prompt sets, fixed seeds, >= 64 pictures
each; at 32 the noise is about +-9 points):

- subject fidelity: "a <trigger> <class> on a <bg> background" drawn as the subject's shape;
  split by backgrounds the training pictures had and ones they never had;
- prompt fidelity: the background asked for, on those same pictures;
- recolouring: "a <colour> <trigger> <class> ...", in a colour the training pictures never had:
  the subject's shape in the asked colour;
- class drift: ordinary prompts ("a red circle on a gray background") drawn right (shape, colour,
  background all), before vs after; and how often the bare class ("a red shape ...") turns into
  the subject: the language drift prior preservation is meant to stop;
- Frechet distance between the judge's features of the subject pictures and of real pictures of
  the subject (the FID idea), and the judge's mean probability for what the prompt asked (the
  CLIP-score idea).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..errors import BaseModelError, DreamloomError
from ..sampling import make_grid
from ..sampling.runs import load_run_model, training_images
from .judge import HEADS, judge_images
from .world import BACKGROUNDS, COLOURS, NAMED, caption, random_scene, render


@dataclass
class Settings:
    samples: int = 64  # per metric
    steps: int = 25
    guidance: float = 3.0
    seed: int = 1000


@dataclass
class Subject:
    """What the run was taught, as the judge sees its training pictures."""

    shape: str
    colour: str
    backgrounds: tuple[str, ...]
    prompt_word: str  # "<trigger> <class>" as prompts name it

    @classmethod
    def from_images(cls, images: list[Image.Image], prompt_word: str) -> "Subject":
        labels = judge_images(images)["labels"]
        shape = max(set(labels["shape"]), key=labels["shape"].count)
        colour = max(set(labels["colour"]), key=labels["colour"].count)
        return cls(shape, colour, tuple(sorted(set(labels["background"]))), prompt_word)


@dataclass
class PromptSet:
    """Prompts with what each asks for; `None` = not asked."""

    prompts: list[str] = field(default_factory=list)
    asked: list[dict] = field(default_factory=list)

    def add(self, prompt: str, **asked) -> None:
        self.prompts.append(prompt)
        self.asked.append(asked)


def prompt_sets(subject: Subject, n: int, seed: int = 0) -> dict[str, PromptSet]:
    rng = np.random.default_rng(seed)
    backgrounds, colours = list(BACKGROUNDS), [c for c in COLOURS if c != subject.colour]
    sets = {name: PromptSet() for name in ("subject", "recolour", "ordinary", "class")}
    for i in range(n):
        bg = backgrounds[i % len(backgrounds)]
        sets["subject"].add(f"a {subject.prompt_word} on a {bg} background", shape=subject.shape, background=bg)
        colour = colours[i % len(colours)]
        sets["recolour"].add(f"a {colour} {subject.prompt_word} on a {bg} background",
                             shape=subject.shape, colour=colour, background=bg)
        shape, colour, bg2 = str(rng.choice(NAMED)), str(rng.choice(list(COLOURS))), str(rng.choice(backgrounds))
        sets["ordinary"].add(caption(colour, shape, bg2), shape=shape, colour=colour, background=bg2)
        colour = str(rng.choice(list(COLOURS)))
        sets["class"].add(caption(colour, "shape", bg2), colour=colour, background=bg2)
    return sets


def draw(pipe, prompts: list[str], settings: Settings, chunk: int = 64) -> list[Image.Image]:
    """One picture per prompt; picture i always starts from the noise of seed `settings.seed + i`,
    so every model is judged on the same starting points. Batched: a toy picture is cheap."""
    images = []
    for first in range(0, len(prompts), chunk):
        batch = prompts[first:first + chunk]
        generators = [torch.Generator("cpu").manual_seed(settings.seed + first + i) for i in range(len(batch))]
        with torch.no_grad():
            images += pipe(prompt=batch, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                           generator=generators).images
    return images


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa Sb)^1/2), via the eigenvalues of Sa^1/2 Sb Sa^1/2."""
    a, b = a.double(), b.double()
    mu = (a.mean(0) - b.mean(0)).pow(2).sum()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(sa)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ sb @ root_a).clamp(min=0).sqrt().sum()
    return float(mu + sa.trace() + sb.trace() - 2 * cross)


def _share(flags) -> float:
    flags = list(flags)
    return 100.0 * sum(flags) / max(len(flags), 1)


def standard_error(share: float, n: int) -> float:
    """Of a share (in %) of n pictures, each right or not (binomial): two shares whose difference is under about twice
    sqrt(se_a^2 + se_b^2) cannot be told apart."""
    return (share * (100.0 - share) / max(n, 1)) ** 0.5


def score(images: list[Image.Image], ps: PromptSet) -> dict:
    """Per attribute asked: share right; all asked right; the judge's mean probability of the asks."""
    judged = judge_images(images)
    out = {}
    keys = sorted({k for a in ps.asked for k in a})
    for key in keys:
        out[key] = _share(judged["labels"][key][i] == a[key] for i, a in enumerate(ps.asked) if key in a)
    out["all"] = _share(all(judged["labels"][k][i] == a[k] for k in a) for i, a in enumerate(ps.asked))
    probs = [judged["probs"][k][i, HEADS[k].index(a[k])].item() for i, a in enumerate(ps.asked) for k in a]
    out["agreement"] = 100.0 * sum(probs) / len(probs)
    out["_labels"] = judged["labels"]
    out["_features"] = judged["features"]
    return out


def evaluate_pipeline(pipe, subject: Subject, settings: Settings,
                      only: tuple[str, ...] | None = None) -> tuple[dict, dict]:
    """The metrics for one model (those of the prompt sets in `only`, default all); returns
    (metrics, the pictures per prompt set)."""
    sets = {k: v for k, v in prompt_sets(subject, settings.samples).items() if only is None or k in only}
    pictures = {name: draw(pipe, ps.prompts, settings) for name, ps in sets.items()}
    scores = {name: score(pictures[name], sets[name]) for name in sets}
    metrics = {}
    if "subject" in scores:
        s, asked, rng = scores["subject"], sets["subject"].asked, np.random.default_rng(4242)
        is_subject = [label == subject.shape for label in s["_labels"]["shape"]]
        bg_right = [label == a["background"] for label, a in zip(s["_labels"]["background"], asked)]
        seen = [i for i, a in enumerate(asked) if a["background"] in subject.backgrounds]
        unseen = [i for i, a in enumerate(asked) if a["background"] not in subject.backgrounds]
        real = [render(random_scene(rng, subject.shape, subject.colour, bg)) for bg in list(BACKGROUNDS) * 32]
        metrics.update({
            "subject_fidelity": s["shape"],
            "subject_seen_backgrounds": _share(is_subject[i] for i in seen),
            "subject_unseen_backgrounds": _share(is_subject[i] and bg_right[i] for i in unseen),
            "prompt_fidelity_background": s["background"],
            "frechet_distance": frechet_distance(s["_features"], judge_images(real)["features"]),
            "agreement": s["agreement"],
        })
    if "recolour" in scores:
        metrics.update(recolour=scores["recolour"]["all"], recolour_colour=scores["recolour"]["colour"])
    if "ordinary" in scores:
        metrics["ordinary_accuracy"] = scores["ordinary"]["all"]
    if "class" in scores:
        labels = scores["class"]["_labels"]["shape"]
        metrics.update(class_as_subject=_share(label == subject.shape for label in labels),
                       class_accuracy=scores["class"]["all"])
    for key, of in SHARES_OF.items():  # the rows methods are compared by, with their noise
        if key in metrics:
            metrics[f"{key}_se"] = standard_error(metrics[key], len(sets[of].prompts))
    return metrics, pictures


SHARES_OF = {"subject_fidelity": "subject", "recolour": "recolour", "recolour_colour": "recolour",
             "ordinary_accuracy": "ordinary", "class_as_subject": "class", "class_accuracy": "class"}


ROWS = [  # (key, label, better)
    ("subject_fidelity", "subject fidelity: drawn as the subject (%)", "higher"),
    ("subject_seen_backgrounds", "  on backgrounds of the training pictures (%)", "higher"),
    ("subject_unseen_backgrounds", "  on other backgrounds, background right too (%)", "higher"),
    ("prompt_fidelity_background", "prompt fidelity: background asked for (%)", "higher"),
    ("recolour", "recolouring: subject in a new colour asked for (%)", "higher"),
    ("recolour_colour", "  colour right (%)", "higher"),
    ("ordinary_accuracy", "ordinary prompts drawn right (%)", "higher"),
    ("class_as_subject", "class prompt drawn as the subject (%)", "lower"),
    ("class_accuracy", "class prompt: colour and background right (%)", "higher"),
    ("frechet_distance", "Frechet distance to real subject pictures (judge features)", "lower"),
    ("agreement", "judge's agreement with the subject prompts (%)", "higher"),
    ("validation_loss", "validation loss: held-out pictures, fixed noise (x1000)", "lower"),
]
SCALE = {"validation_loss": 1000}  # a loss of 0.0123 reads 12.3


def table(columns: dict[str, dict]) -> str:
    names = list(columns)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label, better in ROWS:
        cells = [f"{columns[n][key] * SCALE.get(key, 1):.1f}" + (f" ± {columns[n][key + '_se']:.1f}" if key + "_se"
                 in columns[n] else "") if key in columns[n] else "-" for n in names]
        lines.append(f"| {label.strip()} ({better} is better) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sample_sheet(pictures: dict[str, list[Image.Image]], per_set: int = 8) -> Image.Image:
    rows = [pics[:per_set] for pics in pictures.values()]
    return make_grid([img for row in rows for img in row], cols=per_set)


def subject_word(recipe) -> str:
    d = recipe.data
    return f"{d.trigger} {d.class_word}".strip()


def _on_toy_arch(spec: str) -> bool:
    from ..models import spec_arch

    try:
        return spec_arch(spec).name == "toy"
    except BaseModelError:  # a hub id, or no longer on disk: not a toy base either way
        return False


def evaluate_run(run_path, settings: Settings | None = None, base_metrics: dict | None = None,
                 only: tuple[str, ...] | None = None) -> dict:
    """Evaluate a run and the untouched base on the same prompts; writes <run>/eval/."""
    from ..rundir import RunDir
    from ..models import load_base

    settings = settings or Settings()
    run = RunDir.open(run_path)
    recipe = run.recipe()
    if not _on_toy_arch(recipe.base.model):  # before any weights load: an SD-size base takes a while
        raise DreamloomError(f"run '{run.path}' trained on '{recipe.base.model}'; the toy judge only scores runs on "
                             "the toy base. For real bases pass --clip MODEL (CLIP-T / CLIP-I).")
    base, pipe = load_run_model(run)
    subject = Subject.from_images(training_images(run), subject_word(recipe))
    metrics, pictures = evaluate_pipeline(pipe, subject, settings, only)
    if base_metrics is None:
        base_metrics, _ = evaluate_pipeline(load_base(recipe.base.model).pipeline(), subject, settings, only)
    out = run.path / "eval"
    out.mkdir(exist_ok=True)
    sample_sheet(pictures).save(out / "samples.png")
    report = {"run": str(run.path), "method": recipe.method, "subject": subject.__dict__,
              "settings": settings.__dict__, "metrics": metrics, "base_metrics": base_metrics}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    md = table({"untouched base": base_metrics, recipe.name: metrics})
    (out / "quality.md").write_text(md + "\n")
    return report


def evaluate_checkpoints(run_path, settings: Settings | None = None) -> dict:
    """Every checkpoint the run holds, exported (into exports/step-N) and scored as evaluate_run
    scores the final export, beside the validation loss the run logged at that step: does the lowest
    validation loss pick the checkpoint that draws the subject best? Writes <run>/eval/checkpoints.*"""
    from ..models import load_base
    from ..rundir import RunDir
    from ..trainers.run import export_run

    settings = settings or Settings()
    run = RunDir.open(run_path)
    recipe = run.recipe()
    if not _on_toy_arch(recipe.base.model):
        raise DreamloomError(f"run '{run.path}' trained on '{recipe.base.model}'; the toy judge only scores runs on "
                             "the toy base.")
    steps = run.checkpoint_steps()
    if not steps:
        raise DreamloomError(f"run '{run.path}' has no checkpoint to score.")
    subject = Subject.from_images(training_images(run), subject_word(recipe))
    validation = {e["step"]: e["loss"] for e in run.events() if e["event"] == "validation"}
    base_metrics, _ = evaluate_pipeline(load_base(recipe.base.model).pipeline(), subject, settings)
    if 0 in validation:  # measured before the first step: the untouched base's own validation loss
        base_metrics["validation_loss"] = validation[0]
    columns = {}
    for step in steps:
        paths = export_run(run.path, step=step, overwrite=True)
        _, pipe = load_run_model(run.checkpoint_exports(step), paths)
        metrics, _ = evaluate_pipeline(pipe, subject, settings)
        columns[step] = {**metrics, **({"validation_loss": validation[step]} if step in validation else {})}
    report = {"run": str(run.path), "method": recipe.method, "subject": subject.__dict__,
              "settings": settings.__dict__, "checkpoints": columns, "base_metrics": base_metrics}
    out = run.path / "eval"
    out.mkdir(exist_ok=True)
    (out / "checkpoints.json").write_text(json.dumps(report, indent=2))
    md = table({"untouched base": base_metrics, **{f"step {s}": m for s, m in columns.items()}})
    (out / "checkpoints.md").write_text(md + "\n")
    return report


def base_bar(base, n: int = 128, settings: Settings | None = None, seed: int = 0) -> dict[str, float]:
    """The toy base drawing what it is told: random captions (named shapes), judged per attribute."""
    settings = settings or Settings()
    rng = np.random.default_rng(seed)
    ps = PromptSet()
    for _ in range(n):
        scene = random_scene(rng, shapes=NAMED)
        ps.add(scene.caption(), shape=scene.shape, colour=scene.colour, background=scene.background)
    s = score(draw(base.pipeline(), ps.prompts, settings), ps)
    return {k: s[k] for k in ("shape", "colour", "background", "all")}


BAR = {"shape": 95.0, "colour": 90.0, "background": 95.0}
