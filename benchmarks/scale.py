"""ImageNet scale: torchvision ResNet-50 at 224 px, random weights and random images, 2:4, default configuration.

    python benchmarks/scale.py --images 256 1024 --out runs/scale.json      # this machine (tens of minutes)
    python benchmarks/scale.py --images 1024 --modes capped --device cuda   # a GPU (benchmarks/gpu_check.sh)

Shapes are what matter for time and memory, so weights and images are random (no ImageNet weights here). Each
run happens in its own child process, so that each peak RSS (VmHWM) is its own; never run this beside another
torch process. Modes:

* ``memory``: ``max_memory`` high enough for every activation to stay in memory (where the estimate says it fits);
* ``capped``: ``max_memory=--cap`` (default 6 GB): activations beyond it spill to disk;
* ``dist2``: two gloo processes on this machine, one thread each, each calibrating on half of the images;
  against ``memory``/``capped`` with the machine's threads in one process;
* ``solver``: the OBS solver alone (no dense targets, permutation or statistics correction), in memory: the
  configuration ``benchmarks/prune_speed.py`` holds to its FLOP bound;
* ``recompute``: what the alternative to spilling would cost: re-running the pruned prefix of the graph for every
  prunable layer. Measured as one timed forward pass over the images, node by node (the prefix time at each
  prunable layer, summed over the layers), without pruning anything.

Torch's CPU tensors come from huge pages (``sgfx.runtime.allocator``) unless ``THP_MEM_ALLOC_ENABLE=0`` is set.
Printed: wall time, peak RSS, bytes spilled to disk, and the ratio to the executed-FLOP bound computed as
``benchmarks/prune_speed.py`` does for ResNet-18 (Hessian Gram products, forward passes of the pruned layers,
Cholesky factor and OBS updates at the machine's measured GEMM rate); then, per run, where its time went (the
report's ``time_split``: forward passes, Hessians, dense targets, solves, spill I/O, waiting for other ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from tabulate import tabulate

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import sgfx  # noqa: E402
from prune_speed import HUGE_PAGES, SOLVER_ONLY, gemm_gflops, layer_flops, peak_rss_gb  # noqa: E402

BATCH = 32
IMAGE = 224


def model() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50().eval()


def batches(images: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """Random 224 px batches of 32; rank r of w takes batches r, r+w, ... (the same union for every w)."""
    out = []
    for index in range(rank, images // BATCH, world):
        gen = torch.Generator().manual_seed(index)
        out.append(torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen))
    return out


def child(images: int, cap: str | None, device: str | None, rank: int, world: int, init: str | None,
          solver_only: bool = False, memory_format: str = "auto") -> dict:
    if world > 1:
        import torch.distributed as dist

        torch.set_num_threads(max(1, torch.get_num_threads() // world))
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(world))  # as torchrun sets it: all ranks on this machine
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    calib = batches(images, rank, world)
    options = {"max_memory": cap} if cap else {}
    options.update(SOLVER_ONLY if solver_only else {})
    options["memory_format"] = memory_format
    if device:
        options["device"] = device
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sgfx.sparsify(model(), calib, "2:4", **options)
    total = time.perf_counter() - started
    report = sgfx.get_report(gm)
    result = {"images": images, "total_s": total, "peak_rss_gb": peak_rss_gb(), "memory": report.memory,
              "time_split": report.time_split, "memory_format": report.memory_format,
              "threads": torch.get_num_threads(), "rank": rank, "world": world,
              "layers": [{"name": r.name, "shape": r.weight_shape, "samples": r.samples,
                          "hessian_flops": r.hessian_flops, "dense_targets": r.dense_targets,
                          "status": r.status} for r in report.layers]}
    if device and device.startswith("cuda"):
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if world > 1:
        torch.distributed.destroy_process_group()
    return result


def recompute_cost(images: int) -> dict:
    """One forward pass over the images, timed node by node: the cost of re-running the graph prefix before each
    prunable layer (what recomputation instead of storing would add), against the forward itself."""
    gm = sgfx.passes.trace.trace(model())
    from sgfx.layers import find_prunable_layers

    prunable = set(find_prunable_layers(gm))
    elapsed = {node: 0.0 for node in gm.graph.nodes}

    class Timed(torch.fx.Interpreter):
        def run_node(self, node):
            started = time.perf_counter()
            value = super().run_node(node)
            elapsed[node] += time.perf_counter() - started
            return value

    runner = Timed(gm)
    with torch.no_grad():
        for batch in batches(images):
            runner.run(batch)
    prefix, recompute = 0.0, 0.0
    for node in gm.graph.nodes:
        if node in prunable:
            recompute += prefix  # the graph up to this layer, run again for its inputs
        prefix += elapsed[node]
    return {"images": images, "forward_s": prefix, "recompute_s": recompute, "prunable": len(prunable)}


def run(images: int, cap: str | None, device: str | None, world: int = 1, solver_only: bool = False,
        memory_format: str = "auto") -> dict:
    base = [sys.executable, __file__, "--child", str(images), "--memory-format", memory_format] \
        + (["--cap", cap] if cap else []) + (["--device", device] if device else []) \
        + (["--solver-only"] if solver_only else [])
    if world == 1:
        done = subprocess.run(base, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        started = time.perf_counter()
        procs = [subprocess.Popen(base + ["--rank", str(r), "--world", str(world), "--init", init],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
        outs = [p.communicate() for p in procs]
        wall = time.perf_counter() - started
    for p, (out, err) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"rank failed:\n{err[-3000:]}")
    ranks = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    result = dict(ranks[0])
    result.update(total_s=max(r["total_s"] for r in ranks), wall_s=wall,
                  peak_rss_gb=max(r["peak_rss_gb"] for r in ranks),
                  spilled=[r["memory"].get("spilled_bytes", 0) for r in ranks])
    return result


def flop_bound(result: dict, gflops: float) -> float:
    work = 0.0
    for layer in result["layers"]:
        if layer["status"] == "pruned":
            flops = layer_flops(layer)
            work += sum(flops.values()) - flops["im2col"]
    return work / (gflops * 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--modes", nargs="+", default=["memory", "capped", "solver", "dist2", "recompute"],
                        choices=["memory", "capped", "solver", "dist2", "recompute"])
    parser.add_argument("--cap", default="6GB", help="max_memory of the capped runs (default 6GB)")
    parser.add_argument("--memory-cap", default="22GB", help="max_memory of the in-memory runs")
    parser.add_argument("--dist-images", type=int, nargs="+", default=None,
                        help="image counts for dist2 (default: the smallest of --images)")
    parser.add_argument("--device", default=None, help="e.g. cuda: calibrate on the GPU")
    parser.add_argument("--memory-format", default="auto", choices=["auto", "contiguous", "channels_last"],
                        help="the sweep's memory_format option (default auto: probed per run)")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--solver-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--init", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.cap if args.cap != "none" else None, args.device, args.rank,
                               args.world, args.init, args.solver_only, args.memory_format)))
        return
    gflops = gemm_gflops(torch.float32)
    print(f"machine: {torch.get_num_threads()} threads, GEMM {gflops:.0f} GFLOP/s float32, huge pages "
          f"{'on' if HUGE_PAGES else 'off'}", flush=True)
    results: dict = {"torch": torch.__version__, "gemm_gflops": gflops, "huge_pages": HUGE_PAGES, "runs": []}
    rows = []

    def record(mode: str, result: dict) -> None:
        result["mode"] = mode
        results["runs"].append(result)
        if mode == "recompute":
            row = [mode, result["images"], f"{result['forward_s']:.0f} forward", "", "", "",
                   f"recompute adds {result['recompute_s']:.0f} s"]
        else:
            # across ranks the report rows are the owner's (its own Gram FLOPs): use a single process's bound
            single = [r for r in results["runs"]
                      if r["mode"] in ("memory", "capped") and r["images"] == result["images"]]
            bound = flop_bound(single[0] if mode == "dist2" and single else result, gflops)
            ratio = "n/a" if mode == "dist2" and not single else f"{result['total_s'] / bound:.2f}"
            memory = result["memory"]
            row = [mode, result["images"], f"{result['total_s']:.0f}", f"{result['peak_rss_gb']:.2f}",
                   f"{memory.get('spilled_bytes', 0) / 1e9:.1f}", ratio,
                   f"estimate in memory {memory.get('estimated_in_memory', 0) / 1e9:.1f} GB"]
        rows.append(row)
        print(tabulate([row], tablefmt="plain"), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))

    for images in args.images:
        if "memory" in args.modes:
            record("memory", run(images, args.memory_cap, args.device, memory_format=args.memory_format))
        if "capped" in args.modes:
            record("capped", run(images, args.cap, args.device, memory_format=args.memory_format))
        if "solver" in args.modes:
            record("solver", run(images, args.memory_cap, args.device, solver_only=True,
                                 memory_format=args.memory_format))
    for images in args.dist_images or [min(args.images)]:
        if "dist2" in args.modes:
            record("dist2", run(images, args.cap if "capped" in args.modes else args.memory_cap, args.device, 2,
                                memory_format=args.memory_format))
    if "recompute" in args.modes:
        record("recompute", recompute_cost(min(args.images)))
    print()
    print(tabulate(rows, headers=["mode", "images", "time s", "peak RSS GB", "spilled GB", "time / FLOP bound",
                                  "note"], tablefmt="github"))
    print_time_split([r for r in results["runs"] if "time_split" in r])


def print_time_split(runs: list[dict]) -> None:
    """One column per run: seconds per phase (rank 0's across processes), largest phases first."""
    if not runs:
        return
    phases = sorted({p for r in runs for p in r["time_split"]}, key=lambda p: -max(r["time_split"].get(p, 0)
                                                                                   for r in runs))
    headers = ["phase"] + [f"{r['mode']} {r['images']}" for r in runs]
    table = [[p] + [f"{r['time_split'].get(p, 0.0):.1f}" for r in runs] for p in phases]
    print("\nwhere the time went, s (" + "; ".join(f"{r['mode']} {r['images']}: {r['memory_format'].get('chosen')}"
                                                for r in runs) + ")")
    print(tabulate(table, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
