"""The errors of the torchmeta-compatible layer: metalearn's ``Unsupported`` (a ``ConfigError`` and a
``NotImplementedError``) and ``InvalidArgument`` (a ``ConfigError`` and a ``ValueError``), shared with the other
layer, each one line naming what to use instead."""

from __future__ import annotations

from metalearn.errors import InvalidArgument, Unsupported, unsupported_in

__all__ = ["InvalidArgument", "Unsupported", "unsupported"]


def unsupported(what: str, instead: str) -> Unsupported:
    """``Unsupported("<what> is not supported by metalearn.torchmeta; <instead> (see README ...)")``."""
    return unsupported_in("metalearn.torchmeta", what, instead)
