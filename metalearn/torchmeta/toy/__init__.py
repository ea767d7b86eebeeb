"""torchmeta's ``toy`` regression meta-datasets: ``Sinusoid``, ``Harmonic``, ``SinusoidAndLine``,
and ``toy.helpers`` (``sinusoid``, ``harmonic``, ``sinusoid_and_line``).

``dataset[i]`` is task ``i``, a dataset of ``(input [1], target [1])`` float32 tensors;
``BatchMetaDataLoader`` batches them as ``[inputs [B, n, 1], targets [B, n, 1]]`` (with a
``ClassSplitter``, per split). Tasks are drawn when indexed, each from a generator seeded by its
index and the dataset's seed (``dataset.seed(s)``), so a seeded dataset is the same in every run.
metalearn's own sinusoid regression (``metalearn train data=sinusoid``) is the native equivalent.
"""

from metalearn.torchmeta.toy import helpers
from metalearn.torchmeta.toy._base import ToyMetaDataset, ToyTask
from metalearn.torchmeta.toy.harmonic import Harmonic
from metalearn.torchmeta.toy.sinusoid import Sinusoid
from metalearn.torchmeta.toy.sinusoid_line import SinusoidAndLine

__all__ = ["Sinusoid", "Harmonic", "SinusoidAndLine", "helpers", "ToyMetaDataset", "ToyTask"]
