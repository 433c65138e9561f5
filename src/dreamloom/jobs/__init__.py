from .rundir import RunDir

__all__ = ["RunDir"]
