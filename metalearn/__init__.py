"""metalearn: config-driven meta-learning experiments for PyTorch."""

__version__ = "0.1.0"
