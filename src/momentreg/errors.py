"""The errors momentreg raises for things a user can fix; the CLI prints them as one line."""


class MomentregError(RuntimeError):
    """Base class: a clear message, no traceback needed."""


class CheckpointError(MomentregError):
    """A checkpoint is missing, corrupted, or belongs to another run."""


class TrainingError(MomentregError):
    """Training cannot go on (for example a non-finite loss)."""


class DatasetError(MomentregError):
    """A dataset is missing, corrupted or could not be downloaded; the message says what to do."""


class UsageError(MomentregError):
    """Bad arguments or paths given by the user."""


class ConfigError(MomentregError, ValueError):
    """An invalid setting, argument or model: a ``ValueError`` to library callers, one line at the
    command line (where any other ``ValueError`` is a bug and keeps its traceback)."""
