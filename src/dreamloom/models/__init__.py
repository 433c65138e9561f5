from .base import Base, build_random, check_base_spec, load_base
from .configs import ARCHS, Arch

__all__ = ["ARCHS", "Arch", "Base", "build_random", "check_base_spec", "load_base"]
