"""Not provided: learn2learn's ``optim`` (MetaCurvatureTransform, KroneckerTransform, LearnableOptimizer).

Importing it (``from learn2learn.optim.transforms import ...``) raises one line naming what to use instead.
"""

from metalearn.learn2learn import _NOT_PROVIDED
from metalearn.learn2learn._errors import unsupported

raise unsupported("learn2learn.optim", _NOT_PROVIDED["optim"])
