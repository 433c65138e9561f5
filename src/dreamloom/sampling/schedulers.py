"""Schedulers by the names A1111/Forge and ComfyUI users know, mapped to diffusers' classes with the
settings that make them the same sampler (diffusers' own table of A1111 equivalents)."""

from __future__ import annotations

from ..errors import DreamloomError

# name -> (diffusers class name, settings on top of the base's scheduler config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "DDPM": ("DDPMScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
}


SAMPLER_KEYS = {key for _, settings in SCHEDULERS.values() for key in settings}


def scheduler_name(text: str) -> str:
    """A scheduler's canonical name, whatever its case and spacing ('euler_a', 'dpm++ 2m karras')."""
    wanted = " ".join(text.replace("_", " ").split()).lower()
    for name in SCHEDULERS:
        if name.lower() == wanted:
            return name
    raise DreamloomError(f"unknown scheduler '{text}'; choose one of: {', '.join(SCHEDULERS)}")


def set_scheduler(pipe, name: str | None) -> None:
    """Put the named scheduler on the pipeline, keeping the base's own schedule (beta schedule,
    prediction type, zero-terminal-SNR rescaling); None keeps the pipeline's."""
    if not name:
        return
    import diffusers

    class_name, settings = SCHEDULERS[scheduler_name(name)]
    # What one sampler adds (Karras sigmas, the SDE solver) must not leak into the next one chosen.
    config = {k: v for k, v in pipe.scheduler.config.items() if k not in SAMPLER_KEYS}
    pipe.scheduler = getattr(diffusers, class_name).from_config(config, **settings)
