from .base import Base, build_random, load_base
from .configs import ARCHS, Arch
from .specs import parse_base_spec, spec_arch

__all__ = ["ARCHS", "Arch", "Base", "build_random", "load_base", "parse_base_spec", "spec_arch"]
