"""The small-batch projections (custom_ops/small_linear.py) against cuBLAS on the GPU.

Per projection of the Qwen3-0.6B and 8B shapes, 1 to 16 rows: ours (the fused norm and
activation included where the small-batch graph fuses them) against what the big graph runs
for it (cuBLAS's F.linear, after add_rms_norm and before silu(gate) * up where those apply),
as microseconds and as the share of the copy bandwidth that reading the weight once would
take, for each of our two kernels (the rows kernel and the tiles kernel, forced whatever
ROWS_KERNEL_MAX picks) so that the table shows where the switch belongs. First sweeps of the
launch parameters: the rows kernel's at 1 and 2 rows, the tiles kernel's at 8 and 16. bf16;
times are medians of CUDA-graph replays over enough copies of the inputs to escape L2
(kernels.bench).

    PYTHONPATH=src python bench/small_linear.py [--json $OUT/small_linear.json] [--no-sweep]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).parent))
from kernels import bench, copy_bandwidth  # noqa: E402

import qwen3_aot.custom_ops  # noqa: E402,F401
from qwen3_aot.custom_ops import small_linear as small  # noqa: E402

EPS = 1e-6
OPS = torch.ops.qwen3_aot
# (shape, projection): (N, K, kind); kind: "norm" (add_rms_norm first), "silu" (norm first,
# silu(gate) * up after: N counts the gate rows alone), "plain"
PROJECTIONS = {
    ("0.6B", "qkv"): (4096, 1024, "norm"), ("0.6B", "o"): (1024, 2048, "plain"),
    ("0.6B", "gate_up"): (3072, 1024, "silu"), ("0.6B", "down"): (1024, 3072, "plain"),
    ("8B", "qkv"): (6144, 4096, "norm"), ("8B", "o"): (4096, 4096, "plain"),
    ("8B", "gate_up"): (12288, 4096, "silu"), ("8B", "down"): (4096, 12288, "plain"),
}
ROWS = [1, 2, 4, 8, 16]


def calls(m: int, n: int, k: int, kind: str, ours: bool):
    dt, dev = torch.bfloat16, "cuda"
    w = torch.randn(2 * n if kind == "silu" else n, k, device=dev, dtype=dt) / k ** 0.5
    x, r = torch.randn(m, k, device=dev, dtype=dt), torch.randn(m, k, device=dev, dtype=dt)
    nw = torch.rand(k, device=dev, dtype=dt)
    if kind == "plain":
        return (lambda: OPS.small_linear(x, w)) if ours else (lambda: F.linear(x, w))
    if ours:
        return lambda: OPS.add_rms_norm_linear(x, r, nw, w, EPS, kind == "silu")

    def unfused():
        h, _ = OPS.add_rms_norm(x, r, nw, EPS)
        y = F.linear(h, w)
        if kind == "silu":
            g, u = y.chunk(2, dim=-1)
            return F.silu(g) * u
        return y
    return unfused


def weight_bytes(n: int, k: int, kind: str) -> int:
    return (2 if kind == "silu" else 1) * n * k * 2


KERNELS = {"rows": 16, "tiles": 0}  # the ROWS_KERNEL_MAX that forces each kernel at 1-16 rows


def timed(m: int, n: int, k: int, kind: str, kernel: str) -> float:
    keep = small.ROWS_KERNEL_MAX
    small.ROWS_KERNEL_MAX = KERNELS[kernel]
    try:
        return bench(lambda: calls(m, n, k, kind, True), weight_bytes(n, k, kind))
    finally:
        small.ROWS_KERNEL_MAX = keep


def _sweep(bw: float, kernel: str, names: tuple[str, ...], settings: list[dict], rows: tuple[int, ...]) -> list[dict]:
    """Each setting of the module's launch constants, on the 0.6B projections: % of the bandwidth."""
    keep, out = {name: getattr(small, name) for name in names}, []
    projections = [p for p in PROJECTIONS if p[0] == "0.6B"]
    print(f"{kernel} kernel: " + "".join(f"{name.lower():>14}" for name in names) + f"{'rows':>5}"
          + "".join(f"{p[1]:>9}" for p in projections) + "   (% of bandwidth)")
    try:
        for setting in settings:
            for name, value in setting.items():
                setattr(small, name, value)
            for m in rows:
                pct = []
                for p in projections:
                    n, k, kind = PROJECTIONS[p]
                    try:
                        pct.append(100 * weight_bytes(n, k, kind) / timed(m, n, k, kind, kernel) / bw)
                    except triton.runtime.errors.OutOfResources:  # a tile too large for shared memory
                        pct.append(float("nan"))
                out.append(dict(kernel=kernel, **setting, rows=m, pct=dict(zip([p[1] for p in projections], pct))))
                print(" " * (len(kernel) + 9) + "".join(f"{setting[name]:>14}" for name in names) + f"{m:>5}"
                      + "".join(f"{x:>8.0f}%" for x in pct), flush=True)
    finally:
        for name, value in keep.items():
            setattr(small, name, value)
    return out


def sweep(bw: float) -> list[dict]:
    rows = [dict(TILE_ELEMENTS=tile, WARPS=warps) for tile in (4096, 8192, 16384) for warps in (2, 4, 8)]
    tiles = [dict(DOT_COLUMNS=cols, DOT_INPUTS=inputs, DOT_WARPS=warps)
             for cols in (16, 32, 64) for inputs in (128, 256, 512) for warps in (4, 8)]  # 64 x 512: too large
    return (_sweep(bw, "rows", ("TILE_ELEMENTS", "WARPS"), rows, (1, 2))
            + _sweep(bw, "tiles", ("DOT_COLUMNS", "DOT_INPUTS", "DOT_WARPS"), tiles, (8, 16)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    bw = copy_bandwidth()
    swept = [] if args.no_sweep else sweep(bw)
    rows = []
    for (shape, name), (n, k, kind) in PROJECTIONS.items():
        nbytes = weight_bytes(n, k, kind)
        for m in ROWS:
            rows.append(dict(shape=shape, projection=name, kind=kind, rows=m, N=n, K=k, bytes=nbytes,
                             rows_s=timed(m, n, k, kind, "rows"), tiles_s=timed(m, n, k, kind, "tiles"),
                             cublas_s=bench(lambda: calls(m, n, k, kind, False), nbytes)))
    launch = {name: getattr(small, name) for name in ("TILE_ELEMENTS", "WARPS", "ROWS_KERNEL_MAX", "DOT_ROWS",
                                                       "DOT_COLUMNS", "DOT_INPUTS", "DOT_WARPS")}
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                copy_bandwidth_GBps=bw / 1e9, launch=launch, sweep=swept, rows=rows)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    print(f"\n{info['gpu']}, torch {info['torch']}, triton {info['triton']}, bf16; copy bandwidth "
          f"{bw / 1e9:.0f} GB/s. 'cuBLAS' is the big graph's sequence: add_rms_norm + F.linear (+ silu*up)")
    print(f"launch: {launch}; the chosen kernel's time is starred, speedup is cuBLAS over it")
    print(f"{'shape':<6}{'proj':<9}{'rows':>5}{'rows us':>9}{'tiles us':>10}{'cuBLAS us':>10}{'chosen bw':>10}"
          f"{'cuBLAS bw':>10}{'speedup':>9}")
    for r in rows:
        chosen = r["rows_s"] if r["rows"] <= small.ROWS_KERNEL_MAX else r["tiles_s"]
        star = ("*", " ") if r["rows"] <= small.ROWS_KERNEL_MAX else (" ", "*")
        print(f"{r['shape']:<6}{r['projection']:<9}{r['rows']:>5}{r['rows_s'] * 1e6:>8.1f}{star[0]}"
              f"{r['tiles_s'] * 1e6:>9.1f}{star[1]}{r['cublas_s'] * 1e6:>10.1f}{100 * r['bytes'] / chosen / bw:>9.0f}%"
              f"{100 * r['bytes'] / r['cublas_s'] / bw:>9.0f}%{r['cublas_s'] / chosen:>8.2f}x")


if __name__ == "__main__":
    main()
