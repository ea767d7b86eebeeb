"""metalearn: config-driven meta-learning experiments for PyTorch.

The Python API (metalearn/api.py): ``compose``, ``train``, ``evaluate``, ``load``, ``episodes`` and ``Run``;
``Trainer`` (the engine's loop, which also takes an algorithm object), ``Algorithm`` and ``TaskBatch``
(what your own method subclasses and receives). They are imported on first use, so ``import metalearn``
stays cheap for the command line.
"""

__version__ = "0.1.0"

_API = {
    "compose": "metalearn.api", "train": "metalearn.api", "evaluate": "metalearn.api", "load": "metalearn.api",
    "episodes": "metalearn.api", "Run": "metalearn.api", "Trainer": "metalearn.engine",
    "Algorithm": "metalearn.algorithms.base", "ProblemInfo": "metalearn.algorithms.base",
    "TaskBatch": "metalearn.data.episodes", "MetalearnError": "metalearn.errors", "ConfigError": "metalearn.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'metalearn' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
