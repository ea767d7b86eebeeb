"""User-facing errors.

Every mistake a user can make (bad config, missing data, corrupt checkpoint,
diverged training) raises a subclass of :class:`MetalearnError` whose message
is one line naming the problem and the fix. The CLI prints that line and exits
non-zero; a traceback means a bug in metalearn.
"""


class MetalearnError(Exception):
    """Base class: the message is shown to the user as is, on one line."""

    exit_code = 2


class ConfigError(MetalearnError):
    """An option is unknown, has the wrong type, or the values do not fit together."""


class DataError(MetalearnError):
    """Data is missing, corrupt, or too small for the requested episodes."""


class CheckpointError(MetalearnError):
    """A checkpoint is missing, corrupt, or from an incompatible version."""


class StorageError(MetalearnError):
    """The disk refused a write: full, read-only, or not permitted."""

    exit_code = 4


class TrainingError(MetalearnError):
    """Training cannot go on (e.g. the loss became NaN)."""

    exit_code = 3
