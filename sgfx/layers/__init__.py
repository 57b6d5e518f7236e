"""Prunable layer kinds behind one interface (:class:`PrunableLayer`), their registry, and streaming Hessians.

Kinds (one module each; registering a new one touches one file): :mod:`.linear` (``nn.Linear``, ``F.linear``),
:mod:`.conv` (``nn.Conv1d/2d/3d``, ``F.conv*d``), :mod:`.conv_transpose` (``nn.ConvTranspose1d/2d/3d``,
``F.conv_transpose*d``), :mod:`.module_conv` (conv subclasses with their own forward, kept whole).
``nn.MultiheadAttention`` is opened up into ``F.linear`` calls by :mod:`sgfx.passes.attention` before discovery.
:mod:`.hessian` streams a layer's inputs into its Hessian (with :mod:`.conv_gram`'s shifted correlations for
stride-1 2-D convs); :mod:`.paths` reads and writes dotted paths into a module tree.
"""

from .base import (KINDS, LayerUnsupported, PrunableLayer, find_layer, find_prunable_layers, layer_for_module,
                   register)
from .conv import ConvLayer, is_plain_conv
from .conv_transpose import ConvTransposeLayer
from .hessian import HessianAccumulator
from .linear import LinearLayer
from .module_conv import ModuleConvLayer, fold_weight_transforms, has_own_forward
from .paths import fetch_tensor, get_path, set_path

__all__ = ["PrunableLayer", "LayerUnsupported", "KINDS", "register", "find_layer", "find_prunable_layers",
           "layer_for_module", "fetch_tensor", "get_path", "set_path", "LinearLayer", "ConvLayer", "ConvTransposeLayer",
           "ModuleConvLayer", "HessianAccumulator", "is_plain_conv", "fold_weight_transforms", "has_own_forward"]
