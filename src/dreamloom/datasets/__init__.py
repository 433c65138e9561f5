"""Training data: find and validate images, decode them, cache their VAE latents."""

from dreamloom.datasets.images import load_image
from dreamloom.datasets.latent_cache import LatentCache, module_fingerprint, sample_latents
from dreamloom.datasets.scan import SUPPORTED_SUFFIXES, DataItem, load_items

__all__ = [
    "SUPPORTED_SUFFIXES",
    "DataItem",
    "LatentCache",
    "load_image",
    "load_items",
    "sample_latents",
    "module_fingerprint",
]
