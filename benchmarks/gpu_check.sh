#!/usr/bin/env bash
# The one GPU check, unattended, in a few minutes on an H100/H200 (sgfx never needs a GPU in CI):
#   1. the CUDA tests (semi-structured Linear and 1x1-conv numerics, TensorRT when installed);
#   2. benchmarks/latency.py: dense vs semi_structured (and TensorRT dense/sparse when torch-tensorrt is importable)
#      for ResNet-50 (224 px) and VGG-16, batch 1/32/256, medians after warm-up, ratios within the run, plus the
#      semi-structured outputs against dense at fp16 tolerance;
#   3. benchmarks/scale.py --device cuda: ResNet-50 at 224 px, 1024 random images, calibrated on the GPU (activations
#      on the GPU as far as they fit) and with host memory capped at 6 GB;
#   4. benchmarks/int8_gpu.py: INT8 dense vs INT8 2:4 (cuSPARSELt) products at ResNet-50's conv shapes.
# Output goes to $OUT (the device tool's folder) or runs/gpu. Record the numbers in docs/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # no install step: the device machine has no registry
status=0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: none"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  python3 -c "import tensorrt, torch_tensorrt; print('tensorrt', tensorrt.__version__, 'torch_tensorrt', torch_tensorrt.__version__)" \
    || echo "torch-tensorrt not importable: TensorRT part unmeasured"
} 2>&1 | tee "$out/env.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_lowering.py 2>&1 | tee "$out/cuda_tests.txt" || status=1
timeout 300 python3 benchmarks/latency.py --out "$out/latency.json" 2>&1 | tee "$out/latency.txt" || status=1
timeout 240 python3 benchmarks/scale.py --images 1024 --modes memory capped --memory-cap 100GB --device cuda \
  --out "$out/scale_cuda.json" 2>&1 | tee "$out/scale_cuda.txt" || status=1
timeout 60 python3 benchmarks/int8_gpu.py --out "$out/int8.json" 2>&1 | tee "$out/int8.txt" || status=1
exit $status
