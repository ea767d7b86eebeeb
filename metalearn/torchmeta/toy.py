"""Not provided: torchmeta's ``toy`` regression tasks (``Sinusoid``, ``Harmonic``, ``SinusoidAndLine``).

Importing this module raises ``ImportError`` pointing at metalearn's native sinusoid tasks.
"""

raise ImportError(
    "torchmeta.toy (Sinusoid, Harmonic, SinusoidAndLine) is not supported by metalearn.torchmeta; "
    "use metalearn's native sinusoid regression: metalearn train data=sinusoid backbone=mlp algo=maml "
    "(see README 'Coming from torchmeta')"
)
