"""learn2learn's ``vision``: ``models`` (the few-shot backbones), ``benchmarks`` (``get_tasksets``) and ``transforms``
(``RandomClassRotation``, ``RandomDiscreteRotation``)."""

from metalearn.learn2learn.vision import benchmarks, models, transforms  # noqa: F401
