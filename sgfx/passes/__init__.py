"""Graph passes, one per file: each takes a ``torch.fx.GraphModule`` (and what it needs) and returns it.

``trace`` makes the GraphModule from the user's model (a copy); the others rewrite it in place, before the sweep
(:mod:`sgfx.engine.pipeline` runs them in order): ``open_attention`` opens ``nn.MultiheadAttention`` calls into their
projections, ``fold_weight_transforms`` replaces weight-standardised convs by plain ones, ``schedule_shared_uses``
reorders the graph for weights shared by several calls, ``permute_channels`` reorders channels for N:M,
``insert_quantizers`` adds the INT8 quantizers of ``quantize="int8"`` (``strip_quantizers`` takes them out again for
the QDQ export).
What each did is written into the run's report.
"""

from . import trace  # the module stays ``sgfx.passes.trace``; its function is ``sgfx.passes.trace.trace``
from .attention import open_attention
from .channel_permutation import permute_channels
from .fold import fold_weight_transforms
from .quantizers import insert_quantizers, strip_quantizers
from .schedule import schedule_shared_uses
from .trace import TraceError

__all__ = ["trace", "TraceError", "open_attention", "fold_weight_transforms", "schedule_shared_uses",
           "permute_channels", "insert_quantizers", "strip_quantizers", "PASSES"]

PASSES = (trace.trace, open_attention, fold_weight_transforms, schedule_shared_uses, permute_channels,
          insert_quantizers, strip_quantizers)
