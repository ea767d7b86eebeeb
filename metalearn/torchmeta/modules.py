"""Not provided: torchmeta's ``modules`` (``MetaModule``, ``MetaSequential``, ``MetaConv2d``, ...).

Importing this module raises ``ImportError`` with what to do instead: keep a plain ``nn.Module``
and call it with adapted parameters through ``torch.func.functional_call(model, params, (x,))``;
``metalearn.torchmeta.utils.gradient_based.gradient_update_parameters`` makes those parameters.
"""

raise ImportError(
    "torchmeta.modules (MetaModule, MetaSequential, MetaConv2d, MetaLinear, ...) is not supported by "
    "metalearn.torchmeta; use a plain torch.nn module and torch.func.functional_call(model, params, (x,)) with "
    "params from metalearn.torchmeta.utils.gradient_based.gradient_update_parameters "
    "(see README 'Coming from torchmeta')"
)
