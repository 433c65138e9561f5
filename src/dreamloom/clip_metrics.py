"""CLIP-T, CLIP-I and DINO for runs on real bases (the DreamBooth paper's metrics), with models the
user names: a local folder or a hub id already in the local cache (never a download at run time).

- CLIP-T: cosine similarity of a generated picture and its prompt, with the trigger replaced by the
  class word (the prompt a stranger would write: "a photo of a dog");
- CLIP-I: mean cosine similarity of generated pictures and the training pictures (CLIP image features);
- DINO: the same with a self-supervised ViT's [CLS] features, which tell individuals apart better.
"""

from __future__ import annotations

import torch

from .errors import DreamloomError


def _load(kind: str, spec: str):
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    try:
        if kind == "clip":
            return CLIPModel.from_pretrained(spec, local_files_only=True).eval(), \
                CLIPProcessor.from_pretrained(spec, local_files_only=True)
        return AutoModel.from_pretrained(spec, local_files_only=True).eval(), \
            AutoImageProcessor.from_pretrained(spec, local_files_only=True)
    except Exception as exc:
        raise DreamloomError(f"could not load the {kind.upper()} model '{spec}' ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); pass a local folder with the model "
                             "and its processor (save_pretrained), or a hub id already in the local cache.") from exc


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output (pooler_output) where 4.x returned the tensor."""
    return output if torch.is_tensor(output) else output.pooler_output


@torch.no_grad()
def clip_scores(clip: str, images, prompts: list[str], references) -> dict[str, float]:
    model, processor = _load("clip", clip)
    text = processor(text=prompts, return_tensors="pt", padding=True, truncation=True)
    t = _unit(_features(model.get_text_features(**text)))
    gen = _unit(_features(model.get_image_features(**processor(images=images, return_tensors="pt"))))
    ref = _unit(_features(model.get_image_features(**processor(images=references, return_tensors="pt"))))
    return {"clip_t": float((gen * t).sum(-1).mean()), "clip_i": float((gen @ ref.T).mean())}


@torch.no_grad()
def dino_score(dino: str, images, references) -> float:
    model, processor = _load("dino", dino)

    def cls(batch):
        return _unit(model(**processor(images=batch, return_tensors="pt")).last_hidden_state[:, 0])

    return float((cls(images) @ cls(references).T).mean())


def evaluate_real_run(run_path, clip: str, dino: str | None = None, images_per_prompt: int = 8) -> dict:
    """Sample the run's own sample prompts with its exports attached; score against its training pictures."""
    from .rundir import RunDir
    from .sampling import generate
    from .sampling.runs import load_run_model, training_images

    run = RunDir.open(run_path)
    recipe = run.recipe()
    _, pipe = load_run_model(run)
    s = recipe.sample
    prompts = [recipe.fill(p) for p in s.prompts]
    images = generate(pipe, prompts, negative_prompt=s.negative_prompt, steps=s.steps, guidance_scale=s.guidance_scale,
                      seed=s.seed, images_per_prompt=images_per_prompt)
    stranger = [" ".join(p.replace(recipe.data.trigger, "").split()) for p in prompts for _ in range(images_per_prompt)]
    references = training_images(run)
    scores = clip_scores(clip, images, stranger, references)
    if dino:
        scores["dino"] = dino_score(dino, images, references)
    return scores
