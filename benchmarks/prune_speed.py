"""Solver speed and memory: sgfx's OBS kernel against the published baselines, and pruning end to end.

    python benchmarks/prune_speed.py                      # everything (about 10 minutes on 2 cores)
    python benchmarks/prune_speed.py --parts kernel e2e   # a subset: machine kernel percolumn e2e vgg rss1024

Torch's CPU tensors come from huge pages unless ``THP_MEM_ALLOC_ENABLE=0`` is set (``sgfx.runtime.allocator``).

Never run it beside another torch process: on 2 cores the OpenMP threads oversubscribe and times go several
times off. Every ratio is measured in the same run. End-to-end runs happen in child processes so that each peak
RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import torch
from tabulate import tabulate

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sgfx  # noqa: E402
from sgfx.runtime.allocator import enable_huge_pages  # noqa: E402

HUGE_PAGES = enable_huge_pages()  # before any tensor (THP_MEM_ALLOC_ENABLE=0 in the environment: off); children inherit

from reference_kernels import inverse_factor_reference, per_column, reference_blocked  # noqa: E402

RESNET_SHAPES = [(64, 576), (128, 576), (128, 1152), (128, 64), (256, 1152), (256, 2304), (256, 128),
                 (512, 2304), (512, 4608), (512, 256), (10, 512)]


def timed(fn, repeats=3):
    """Median wall time of ``repeats`` calls (after one warm-up when repeats > 1) and the last result."""
    if repeats > 1:
        fn()
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def gemm_gflops(dtype=torch.float32, sizes=(1024, 2048, 4096), repeats=5) -> float:
    """Peak GEMM throughput: the best rate of ``repeats`` square products at each size (a bound should use the
    best the machine does; these 2 cores vary by ±10 % from run to run)."""
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            best = max(best, 2 * size ** 3 / (time.perf_counter() - started) / 1e9)
    return best


def problem(rows, cols, seed=0, samples=None):
    """A weight and a Hessian from correlated inputs, as real layers have."""
    gen = torch.Generator().manual_seed(seed)
    samples = samples or 2 * cols
    rank = max(8, cols // 2)
    mixing = torch.randn(rank, cols, generator=gen) + 0.5 * torch.randn(1, cols, generator=gen)
    x = torch.randn(samples, rank, generator=gen) @ mixing
    hessian = 2.0 / samples * (x.T @ x)
    return torch.randn(rows, cols, generator=gen) * 0.05, hessian


# -------------------------------------------------------------------------------------------------- parts
def part_machine() -> dict:
    result = {"threads": torch.get_num_threads(), "gemm_f32_gflops": gemm_gflops(torch.float32),
              "gemm_f64_gflops": gemm_gflops(torch.float64), "huge_pages": HUGE_PAGES}
    print(f"\nmachine: {result['threads']} threads, GEMM {result['gemm_f32_gflops']:.0f} GFLOP/s float32, "
          f"{result['gemm_f64_gflops']:.0f} float64, huge pages {'on' if HUGE_PAGES else 'off'}")
    return result


def part_kernel() -> list[dict]:
    """Ratio 1: sgfx kernel vs the reference blocked algorithm, float32, same W and H, 2:4."""
    rows_out = []
    for rows, cols in RESNET_SHAPES:
        weight, hessian = problem(rows, cols)
        t_ref, (w_ref, m_ref) = timed(lambda: reference_blocked(weight, hessian, 2, 4))
        t_sgfx, res = timed(lambda: sgfx.sparsegpt_prune(weight, hessian, sgfx.NMPattern(2, 4)))
        # ground truth: the same solve in float64 (equal to the per-column OBS reference in the tests)
        truth = sgfx.sparsegpt_prune(weight.double(), hessian.double(), sgfx.NMPattern(2, 4), dtype=torch.float64)

        def vs_truth(w, mask):
            return float((mask == truth.pruned).float().mean()), float((w.double() - truth.weight).norm()
                                                                       / truth.weight.norm())

        rows_out.append({"shape": f"{rows}x{cols}", "reference_s": t_ref, "sgfx_s": t_sgfx, "speedup": t_ref / t_sgfx,
                         "reference_vs_f64": vs_truth(w_ref, m_ref), "sgfx_vs_f64": vs_truth(res.weight, res.pruned)})
    print("\n1. OBS kernel vs the reference blocked SparseGPT (float32, blocksize 128, 2:4, median of 3);\n"
          "   both compared with the float64 solve: mask agreement / relative weight difference")
    print(tabulate([[r["shape"], f"{r['reference_s']:.3f}", f"{r['sgfx_s']:.3f}", f"{r['speedup']:.2f}x",
                     "{:.4f} / {:.1e}".format(*r["reference_vs_f64"]), "{:.4f} / {:.1e}".format(*r["sgfx_vs_f64"])]
                    for r in rows_out],
                   headers=["W shape", "reference s", "sgfx s", "speed-up", "reference vs f64", "sgfx vs f64"],
                   tablefmt="github"))
    return rows_out


def part_percolumn() -> list[dict]:
    """Ratio 2: sgfx kernel vs the unblocked per-column method, at 512x4608 and (extrapolated) 4096x25088."""
    out = []
    weight, hessian = problem(512, 4608)
    t_pc, (w_pc, m_pc) = timed(lambda: per_column(weight, hessian, 2, 4), repeats=1)
    t_sgfx, res = timed(lambda: sgfx.sparsegpt_prune(weight, hessian, sgfx.NMPattern(2, 4)), repeats=1)
    out.append({"shape": "512x4608", "per_column_s": t_pc, "sgfx_s": t_sgfx, "speedup": t_pc / t_sgfx,
                "how": "measured", "mask_agreement": float((res.pruned == m_pc).float().mean())})
    del weight, hessian, w_pc, m_pc, res
    # VGG-16's first classifier layer: rank <= 256 Hessian (256 calibration images of a 1x1 map replicated 7x7)
    rows, cols, slice_cols = 4096, 25088, 256
    weight, hessian = problem(rows, cols, samples=256)
    started = time.perf_counter()
    res = sgfx.sparsegpt_prune(weight, hessian, sgfx.NMPattern(2, 4), overwrite_hessian=False)
    t_sgfx = time.perf_counter() - started
    del res
    # per-column: factor timed at full size, the column loop on its first `slice_cols` columns, extrapolated
    # by the work left (each column updates every column after it).
    t_factor, hinv = timed(lambda: inverse_factor_reference(hessian), repeats=1)
    started = time.perf_counter()
    per_column(weight, hessian, 2, 4, hinv=hinv, limit=slice_cols)
    t_slice = time.perf_counter() - started
    work_total = sum(cols - j for j in range(cols))
    work_slice = sum(cols - j for j in range(slice_cols))
    t_pc = t_factor + t_slice * work_total / work_slice
    out.append({"shape": f"{rows}x{cols}", "per_column_s": t_pc, "sgfx_s": t_sgfx, "speedup": t_pc / t_sgfx,
                "how": f"factor {t_factor:.0f} s measured + loop on {slice_cols} cols ({t_slice:.1f} s) extrapolated",
                "mask_agreement": None})
    print("\n2. OBS kernel vs the per-column method (one rank-1 update of all remaining columns per column)")
    print(tabulate([[r["shape"], f"{r['per_column_s']:.1f}", f"{r['sgfx_s']:.1f}", f"{r['speedup']:.1f}x", r["how"]]
                    for r in out], headers=["W shape", "per-column s", "sgfx s", "speed-up", "how"],
                   tablefmt="github"))
    return out


def peak_rss_gb() -> float:
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that across exec, so a
    child would report its parent's peak."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


# The FLOP bound counts the Hessians and the OBS solve: time that work alone unless --default-config is given
# (the default adds channel permutation, the dense model in lockstep and dense-target products).
SOLVER_ONLY = dict(dense_targets=False, permute_channels=False, stats_correction=False)


def _child(model_name: str, calib_count: int, random_init: bool = False, default_config: bool = False) -> dict:
    """One end-to-end sparsify in this (child) process; returns timings, FLOPs and peak RSS."""
    import common

    torch.manual_seed(0)
    spec = common.MODELS[model_name]
    model = spec.build().eval()
    checkpoint = None if random_init else common.find_checkpoint(spec, common.DEFAULT_CACHE)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
    calib = [torch.randn(64, 3, 32, 32) for _ in range(calib_count // 64)]
    started = time.perf_counter()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sgfx.sparsify(model, calib, "2:4", **({} if default_config else SOLVER_ONLY))
    total = time.perf_counter() - started
    records = sgfx.get_report(gm).layers
    return {
        "model": model_name, "calib": calib_count, "weights": "checkpoint" if checkpoint else "random init",
        "config": "default" if default_config else "solver only",
        "total_s": total, "peak_rss_gb": peak_rss_gb(), "time_split": sgfx.get_report(gm).time_split,
        "memory_format": sgfx.get_report(gm).memory_format,
        "layers": [{"name": r.name, "shape": r.weight_shape, "samples": r.samples, "hessian_s": r.hessian_s,
                    "hessian_flops": r.hessian_flops, "dense_targets": r.dense_targets,
                    "factor_s": r.factor_s, "solve_s": r.solve_s, "status": r.status} for r in records],
    }


RANDOM_INIT = False  # set by --random-init
DEFAULT_CONFIG = False  # set by --default-config


def run_child(model_name: str, calib_count: int) -> dict:
    cmd = [sys.executable, __file__, "--child", model_name, str(calib_count)]
    cmd += ["--random-init"] if RANDOM_INIT else []
    cmd += ["--default-config"] if DEFAULT_CONFIG else []
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def layer_flops(layer: dict) -> dict:
    """FLOPs of the work sgfx does for one pruned layer (2:4, blocksize 128). "hessian" is what its Gram products
    executed (shifted correlations or tiled im2col products, as sgfx chose); "im2col" is what a straightforward
    implementation needs, for comparison only: the symmetric im2col product n·cols², plus the full cross product
    2·n·cols² on layers fitted to dense targets."""
    rows, cols = layer["shape"][0], int(torch.tensor(layer["shape"][1:]).prod())
    n = layer["samples"]
    return {
        "forward": 2 * n * rows * cols,  # the layer's own forward pass over the calibration inputs
        "hessian": layer["hessian_flops"],
        "im2col": n * cols * cols * (3 if layer["dense_targets"] else 1),  # + the full cross product 2·n·cols²
        "factor": cols ** 3 / 3,  # one Cholesky
        "update": rows * cols * cols,  # lazy block updates: 2·rows·cols²/2
        "loop": rows * cols * 128,  # in-block rank-1 updates: 2·rows·cols·b/2
    }


def part_e2e(machine: dict, model_name: str = "resnet18_cifar", calib_count: int = 256) -> dict:
    result = run_child(model_name, calib_count)
    gflops = machine["gemm_f32_gflops"]
    table, totals = [], {"forward": 0.0, "hessian": 0.0, "im2col": 0.0, "factor": 0.0, "update": 0.0, "loop": 0.0}
    for layer in result["layers"]:
        if layer["status"] != "pruned":
            continue
        flops = layer_flops(layer)
        for key in totals:
            totals[key] += flops[key]
        table.append([layer["name"], "x".join(map(str, layer["shape"])), f"{layer['hessian_s']:.2f}",
                      f"{layer['factor_s']:.2f}", f"{layer['solve_s'] - layer['factor_s']:.2f}",
                      f"{layer['hessian_s'] + layer['solve_s']:.2f}"])
    work = sum(totals.values()) - totals["im2col"]
    bound = work / (gflops * 1e9)
    im2col_bound = (work - totals["hessian"] + totals["im2col"]) / (gflops * 1e9)
    result.update(flops=totals, bound_s=bound, ratio_to_bound=result["total_s"] / bound,
                  im2col_bound_s=im2col_bound, ratio_to_im2col_bound=result["total_s"] / im2col_bound)
    print(f"\n3. {model_name}, {calib_count} calibration images ({result['weights']}): per layer, seconds")
    print(tabulate(table, headers=["layer", "weight", "Hessian", "factor", "solve", "total"], tablefmt="github"))
    print(f"end to end {result['total_s']:.1f} s, peak RSS {result['peak_rss_gb']:.2f} GB; "
          f"work {work / 1e9:.0f} GFLOP (forward {totals['forward'] / 1e9:.0f}, "
          f"Hessian {totals['hessian'] / 1e9:.0f}, factor "
          f"{totals['factor'] / 1e9:.0f}, updates {(totals['update'] + totals['loop']) / 1e9:.0f}); "
          f"bound at {gflops:.0f} GFLOP/s = {bound:.1f} s; actual / bound = {result['ratio_to_bound']:.2f}\n"
          f"with symmetric im2col Hessians ({totals['im2col'] / 1e9:.0f} GFLOP) the same work would be bounded by "
          f"{im2col_bound:.1f} s; actual / that bound = {result['ratio_to_im2col_bound']:.2f}")
    split = sorted(result["time_split"].items(), key=lambda item: -item[1])
    print(f"where the time went ({result['memory_format'].get('chosen')} forward passes): "
          + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in split if seconds >= 0.05))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["machine", "kernel", "percolumn", "e2e", "vgg", "rss1024"])
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write all results as JSON")
    parser.add_argument("--random-init", action="store_true", help="end-to-end runs ignore shared checkpoints")
    parser.add_argument("--default-config", action="store_true",
                        help="end-to-end runs use sparsify's default remedies (default: the solver alone)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "CALIB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]), args.random_init, args.default_config)))
        return
    global RANDOM_INIT, DEFAULT_CONFIG
    RANDOM_INIT = args.random_init
    DEFAULT_CONFIG = args.default_config
    results: dict = {"torch": torch.__version__}
    results["machine"] = part_machine()
    if "kernel" in args.parts:
        results["kernel"] = part_kernel()
    if "percolumn" in args.parts:
        results["percolumn"] = part_percolumn()
    if "e2e" in args.parts:
        results["resnet18"] = part_e2e(results["machine"])
    if "vgg" in args.parts:
        results["vgg16"] = part_e2e(results["machine"], "vgg16_cifar", 256)
    if "rss1024" in args.parts:
        big = run_child("resnet18_cifar", 1024)
        results["resnet18_1024"] = {k: big[k] for k in ("total_s", "peak_rss_gb")}
        print(f"\n4. resnet18_cifar with 1024 calibration images: {big['total_s']:.1f} s, "
              f"peak RSS {big['peak_rss_gb']:.2f} GB")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
