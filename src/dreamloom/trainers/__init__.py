"""Training: the Method interface, the methods, and the one loop they share."""

from .registry import METHODS, get_method

__all__ = ["METHODS", "get_method"]
