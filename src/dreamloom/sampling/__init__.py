from .images import generate, make_grid
from .sampler import attach_loras, parse_weighted

__all__ = ["attach_loras", "generate", "make_grid", "parse_weighted"]
