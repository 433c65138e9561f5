"""User-facing errors: each message names the file or key at fault and says how to fix it."""


class DreamloomError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class RecipeError(DreamloomError):
    """A recipe that cannot be used as written."""


class DatasetError(DreamloomError):
    """Images or captions that cannot be trained on."""


class BaseModelError(DreamloomError):
    """A base model that cannot be found or loaded."""


class AdapterError(DreamloomError):
    """An adapter file that does not fit the base model or is not in a known format."""


class TrainingStopped(DreamloomError):
    """Training was asked to stop (SIGTERM, a cancel from the queue) and checkpointed first."""

    exit_code = 3  # what the trainer process exits with: the job queue reads it as "cancelled"
