"""INT8 dense vs INT8 2:4 matrix products on the GPU (cuSPARSELt through torch's semi-structured tensors).

    python benchmarks/int8_gpu.py --out runs/gpu/int8.json

TensorRT is absent on the device machine, so this measures the kernels TensorRT's sparse INT8 convolutions reduce
to: each ResNet-50 conv at batch 32 and 224 px as its implicit GEMM, ``W (C_out, K) @ X (K, tokens)`` with ``W``
2:4 along K (how sgfx prunes it), dense ``torch._int_mm`` against ``torch.mm`` on the semi-structured ``W``. Both
in the same run, CUDA-event medians after warm-up, the products checked equal (integer arithmetic is exact).
Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import torch

# (C_out, K = C_in * kh * kw, tokens = batch * H * W) of ResNet-50's distinct convs at batch 32, 224 px
SHAPES = [(64, 576, 32 * 56 * 56), (256, 64, 32 * 56 * 56), (128, 1152, 32 * 28 * 28), (512, 128, 32 * 28 * 28),
          (256, 2304, 32 * 14 * 14), (1024, 256, 32 * 14 * 14), (512, 4608, 32 * 7 * 7), (2048, 512, 32 * 7 * 7)]


def two_four(rows: int, cols: int) -> torch.Tensor:
    weight = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, device="cuda")
    keep = torch.rand(rows, cols // 4, 4, device="cuda").argsort(-1)[..., :2]
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool, device="cuda").scatter_(-1, keep, True)
    return weight * mask.view(rows, cols)


def median_ms(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: INT8 GPU check skipped")
        return 0
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for c_out, k, tokens in SHAPES:
        weight = two_four(c_out, k)
        x = torch.randint(-127, 128, (k, tokens), dtype=torch.int8, device="cuda")
        entry = {"C_out": c_out, "K": k, "tokens": tokens}
        try:
            dense_ms = median_ms(lambda: torch._int_mm(weight, x), args.repeats)
            sparse_weight = to_sparse_semi_structured(weight)
            product = torch.mm(sparse_weight, x)
            exact = torch.equal(product.to(torch.int32), torch._int_mm(weight, x)) if product.dtype == torch.int32 \
                else torch.equal(product.float(), torch._int_mm(weight, x).clamp(-128, 127).float())
            sparse_ms = median_ms(lambda: torch.mm(sparse_weight, x), args.repeats)
            entry.update(dense_int8_ms=round(dense_ms, 4), sparse_int8_ms=round(sparse_ms, 4),
                         speedup=round(dense_ms / sparse_ms, 3), out_dtype=str(product.dtype), exact=exact)
        except Exception as exc:  # a shape or dtype the installed kernels refuse: say so, go on
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        print(json.dumps(entry))
        rows.append(entry)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
