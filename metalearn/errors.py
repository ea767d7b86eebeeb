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


class Unsupported(ConfigError, NotImplementedError):
    """A name of torchmeta's or learn2learn's API that metalearn's compatibility layers do not provide (also the
    ``NotImplementedError`` code written for those libraries expects)."""


class InvalidArgument(ConfigError, ValueError):
    """An argument of torchmeta's or learn2learn's API with a value the library would refuse too (also a
    ``ValueError``)."""


def unsupported_in(layer: str, what: str, instead: str) -> Unsupported:
    """``Unsupported("<what> is not supported by <layer>; <instead> (see README ...)")``."""
    return Unsupported(f"{what} is not supported by {layer}; {instead} (see README 'Coming from torchmeta or learn2learn')")


def not_provided(layer: str, qualname: str, instead: str):
    """A stand-in for ``qualname`` (e.g. ``torchmeta.utils.data.SequenceMetaDataset``) of a library's API that
    ``layer`` does not provide: importing it works, calling it raises ``unsupported_in(layer, qualname, instead)``."""
    def refuse(*args, **kwargs):
        raise unsupported_in(layer, qualname, instead)

    refuse.__name__ = refuse.__qualname__ = qualname.rsplit(".", 1)[-1]
    refuse.__doc__ = f"Not provided: calling it raises ``Unsupported`` ({instead})."
    return refuse
