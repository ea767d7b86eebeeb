"""The errors of the torchmeta-compatible layer.

Both are metalearn ``ConfigError``s (one line naming the option and the fix, shown as is by the
CLI) and also the built-in exception torchmeta code expects: ``Unsupported`` is a
``NotImplementedError``, ``InvalidArgument`` a ``ValueError``.
"""

from __future__ import annotations

from metalearn.errors import ConfigError

#: Where the README explains the migration and what is (not) supported.
SEE = "see README 'Coming from torchmeta or learn2learn'"


class Unsupported(ConfigError, NotImplementedError):
    """A torchmeta option or class that metalearn.torchmeta does not provide."""


class InvalidArgument(ConfigError, ValueError):
    """A torchmeta argument with a value torchmeta would refuse too."""


def unsupported(what: str, instead: str) -> Unsupported:
    """``Unsupported("<what> is not supported by metalearn.torchmeta; <instead> (see README ...)")``."""
    return Unsupported(f"{what} is not supported by metalearn.torchmeta; {instead} ({SEE})")
