"""The errors of the learn2learn-compatible layer.

Both are metalearn ``ConfigError``s (one line naming the option and the fix, shown as is by the
CLI) and also the built-in exception learn2learn code expects: ``Unsupported`` is a
``NotImplementedError``, ``InvalidArgument`` a ``ValueError``.
"""

from __future__ import annotations

from metalearn.errors import ConfigError

#: Where the README explains the migration and what is (not) supported.
SEE = "see README 'Coming from torchmeta or learn2learn'"


class Unsupported(ConfigError, NotImplementedError):
    """A learn2learn option or class that metalearn.learn2learn does not provide."""


class InvalidArgument(ConfigError, ValueError):
    """A learn2learn argument with a value learn2learn would refuse too (or fail on later, less clearly)."""


def unsupported(what: str, instead: str) -> Unsupported:
    """``Unsupported("<what> is not supported by metalearn.learn2learn; <instead> (see README ...)")``."""
    return Unsupported(f"{what} is not supported by metalearn.learn2learn; {instead} ({SEE})")
