"""The small-batch projections (custom_ops/small_linear.py) against cuBLAS on the GPU.

Per projection of the Qwen3-0.6B and 8B shapes, 1 to 16 rows: ours (the fused norm and
activation included where the small-batch graph fuses them) against what the big graph runs
for it (cuBLAS's F.linear, after add_rms_norm and before silu(gate) * up where those apply),
as microseconds and as the share of the copy bandwidth that reading the weight once would
take. First a sweep of the launch parameters at 1 and 8 rows. bf16; times are medians of
CUDA-graph replays over enough copies of the inputs to escape L2 (bench_support.replayed_call_seconds).

    PYTHONPATH=src python bench/small_linear.py [--json $OUT/small_linear.json] [--no-sweep]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_support import copy_bandwidth, replayed_call_seconds, system_info  # noqa: E402

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


def sweep(bw: float) -> list[dict]:
    """Every launch tried on the 0.6B projections at 1 and 8 rows: % of the bandwidth."""
    keep, out = (small.TILE_ELEMENTS, small.WARPS), []
    names = [p for p in PROJECTIONS if p[0] == "0.6B"]
    print(f"{'tile':>7}{'warps':>6}{'rows':>5}" + "".join(f"{p[1]:>9}" for p in names) + "   (% of bandwidth)")
    try:
        for tile in (4096, 8192, 16384):
            for warps in (2, 4, 8):
                small.TILE_ELEMENTS, small.WARPS = tile, warps
                for m in (1, 8):
                    pct = []
                    for p in names:
                        n, k, kind = PROJECTIONS[p]
                        nbytes = weight_bytes(n, k, kind)
                        seconds = replayed_call_seconds(lambda: calls(m, n, k, kind, True), nbytes)
                        pct.append(100 * nbytes / seconds / bw)
                    out.append(dict(tile=tile, warps=warps, rows=m, pct=dict(zip([p[1] for p in names], pct))))
                    print(f"{tile:>7}{warps:>6}{m:>5}" + "".join(f"{x:>8.0f}%" for x in pct), flush=True)
    finally:
        small.TILE_ELEMENTS, small.WARPS = keep
    return out


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
            ours = replayed_call_seconds(lambda: calls(m, n, k, kind, True), nbytes)
            theirs = replayed_call_seconds(lambda: calls(m, n, k, kind, False), nbytes)
            rows.append(dict(shape=shape, projection=name, kind=kind, rows=m, N=n, K=k, bytes=nbytes,
                             ours_s=ours, cublas_s=theirs))
    info = dict(**system_info(), copy_bandwidth_GBps=bw / 1e9, tile_elements=small.TILE_ELEMENTS, warps=small.WARPS,
                sweep=swept, rows=rows)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    print(f"\n{info['gpu']}, torch {info['torch']}, triton {info['triton']}, bf16; copy bandwidth "
          f"{bw / 1e9:.0f} GB/s. 'cuBLAS' is the big graph's sequence: add_rms_norm + F.linear (+ silu*up)")
    print(f"{'shape':<6}{'proj':<9}{'rows':>5}{'ours us':>9}{'cuBLAS us':>10}{'ours bw':>9}{'cuBLAS bw':>10}"
          f"{'speedup':>9}")
    for r in rows:
        print(f"{r['shape']:<6}{r['projection']:<9}{r['rows']:>5}{r['ours_s'] * 1e6:>9.1f}{r['cublas_s'] * 1e6:>10.1f}"
              f"{100 * r['bytes'] / r['ours_s'] / bw:>8.0f}%{100 * r['bytes'] / r['cublas_s'] / bw:>9.0f}%"
              f"{r['cublas_s'] / r['ours_s']:>8.2f}x")


if __name__ == "__main__":
    main()
