"""Prunable layer kinds behind one interface (:class:`PrunableLayer`), their registry, and streaming Hessians.

Kinds (one module each; registering a new one touches one file): :mod:`.linear` (``nn.Linear``, ``F.linear``),
:mod:`.conv` (``nn.Conv1d/2d/3d``, ``F.conv*d``), :mod:`.conv_transpose` (``nn.ConvTranspose1d/2d/3d``,
``F.conv_transpose*d``), :mod:`.module_conv` (conv subclasses with their own forward, kept whole).
``nn.MultiheadAttention`` is opened up into ``F.linear`` calls by :mod:`sgfx.passes.attention` before discovery.
"""

from .base import KINDS, LayerUnsupported, PrunableLayer, fetch_tensor, find_layer, layer_for_module, register
from .conv import ConvLayer, conv_column_permutation
from .conv_transpose import ConvTransposeLayer
from .hessian import HessianAccumulator
from .linear import LinearLayer
from .module_conv import ModuleConvLayer, fold_weight_transforms, has_own_forward

__all__ = ["PrunableLayer", "LayerUnsupported", "KINDS", "register", "find_layer", "layer_for_module", "fetch_tensor",
           "LinearLayer",
           "ConvLayer", "ConvTransposeLayer", "ModuleConvLayer", "HessianAccumulator", "conv_column_permutation",
           "fold_weight_transforms", "has_own_forward"]
