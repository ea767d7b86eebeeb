"""Baseline++ (Chen, Liu, Kira, Wang & Huang, "A Closer Look at Few-shot Classification",
ICLR 2019, arXiv:1904.04232): Baseline with a cosine-similarity head.

The algorithm is ``baseline.py``'s with ``head: cosine`` as the default; this module only gives it
its own name (``algo=baseline_pp``), so its config and checkpoints say which method ran. See
``baseline.py`` for the method and every choice that differs from the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from metalearn.algorithms import baseline


@dataclass
class Config(baseline.Config):
    name: str = "baseline_pp"
    head: str = "cosine"  # cosine (Baseline++) | linear (Baseline)


build = baseline.build  # the same algorithm
