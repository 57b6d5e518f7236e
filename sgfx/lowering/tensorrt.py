"""Lower a sparsified GraphModule to TensorRT engines with sparse weights (optional: ``pip install sgfx[tensorrt]``).

Why: TensorRT is the NVIDIA runtime that runs 2:4 convolutions *and* matmuls on sparse tensor cores. On the
dynamo path the precision follows the model's dtype, so the model and inputs are cast (fp16 by default) before
``torch_tensorrt.compile(..., ir="dynamo", sparse_weights=True)``.
"""

from __future__ import annotations

import copy
from typing import Any, Collection, Sequence

import torch
import torch.fx

__all__ = ["lower_tensorrt"]


def lower_tensorrt(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor], dtype: torch.dtype = torch.float16,
                   min_block_size: int = 5, torch_executed_ops: Collection[Any] = ()) -> torch.nn.Module:
    """Compile ``gm`` with Torch-TensorRT, sparse weights enabled.

    Raises:
        ImportError: torch-tensorrt is not installed (with the install command).
        RuntimeError: no CUDA device.
    """
    try:
        import torch_tensorrt
    except ImportError:
        raise ImportError("backend='tensorrt' needs Torch-TensorRT: pip install 'sgfx[tensorrt]' "
                          "(NVIDIA GPU and a matching CUDA/TensorRT required)") from None
    if not torch.cuda.is_available():
        raise RuntimeError("backend='tensorrt' needs a CUDA GPU; none is available here")
    if not example_inputs:
        raise ValueError("backend='tensorrt' needs example_inputs=(x,) to build its engines")
    model = copy.deepcopy(gm).to(device="cuda", dtype=dtype).eval()
    inputs = [x.to(device="cuda", dtype=dtype) if x.is_floating_point() else x.cuda() for x in example_inputs]
    return torch_tensorrt.compile(model, ir="dynamo", inputs=inputs, sparse_weights=True,
                                  min_block_size=min_block_size, torch_executed_ops=set(torch_executed_ops))
