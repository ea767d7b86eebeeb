"""learn2learn's ``vision``: ``models`` (the few-shot backbones) and ``benchmarks`` (``get_tasksets``)."""

from metalearn.learn2learn.vision import benchmarks, models  # noqa: F401
