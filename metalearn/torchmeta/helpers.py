"""``metalearn.torchmeta.helpers``: the helpers of ``metalearn.torchmeta.datasets.helpers``
(torchmeta keeps them in ``torchmeta.datasets.helpers``; both import paths work)."""

from metalearn.torchmeta.datasets.helpers import *  # noqa: F401,F403
from metalearn.torchmeta.datasets.helpers import __all__  # noqa: F401
