"""torchmeta's ``utils``: ``utils.data`` (the loaders) and ``utils.gradient_based``."""

from metalearn.torchmeta.utils import data, gradient_based  # noqa: F401
from metalearn.torchmeta.utils.gradient_based import gradient_update_parameters  # noqa: F401
