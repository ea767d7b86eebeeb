"""A learn2learn-compatible API on today's PyTorch.

learn2learn's Cython extension does not build on Python 3.11+, so it no longer installs beside a
current torch. Scripts written for it run here with the import line changed:

    import learn2learn as l2l        ->  import metalearn.learn2learn as l2l

Provided: ``algorithms`` (MAML, MetaSGD, GBML), ``utils`` (clone_module, update_module, detach_module,
clone_parameters), ``data`` (MetaDataset, UnionMetaDataset, FilteredMetaDataset, Taskset and its task
transforms), ``nn`` (PrototypicalClassifier, Lambda, Flatten, Scale) and ``vision`` (models, benchmarks,
transforms).
What is not provided raises one line naming metalearn's equivalent (README, "Coming from torchmeta or
learn2learn").
"""

from metalearn.learn2learn import algorithms, data, nn, utils, vision  # noqa: F401
from metalearn.learn2learn.utils import (  # noqa: F401  (learn2learn's top-level names)
    clone_module, clone_parameters, detach_module, magic_box, update_module)


#: learn2learn's modules that metalearn does not provide: what to use instead.
_NOT_PROVIDED = {
    "optim": "give GBML a transform that builds an nn.Module per parameter (MetaCurvature's role), or use MetaSGD",
    "gym": "meta-reinforcement learning is not provided yet",
    "text": "use metalearn's image datasets, or your own data through data=imagefolder",
}


def __getattr__(name: str):
    if name in _NOT_PROVIDED:
        from metalearn.learn2learn._errors import unsupported

        raise unsupported(f"learn2learn.{name}", _NOT_PROVIDED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
