"""Kernel benchmark on the GPU: our ops against torch eager and the copy-bandwidth floor.

Qwen3-0.6B shapes (hidden 1024, 16 q heads, 8 kv heads, head_dim 128), bf16, 1 to 4096
tokens. Times are medians of CUDA-graph replays (bench_support.replayed_call_seconds). Prints a table last
and writes JSON to --json.

    PYTHONPATH=src python bench/kernel_bench.py --json $OUT/kernels.json
"""

from __future__ import annotations

import argparse
import json

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_support import copy_bandwidth, replayed_call_seconds, system_info  # noqa: E402

import qwen3_aot.custom_ops  # noqa: E402,F401
from qwen3_aot.custom_ops.qkv_rope import rope_cos_sin  # noqa: E402

H, HQ, HKV, D, EPS = 1024, 16, 8, 128, 1e-6
TOKENS = [1, 16, 128, 512, 2048, 4096]


def torch_rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """transformers' Qwen3RMSNorm, the eager baseline."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def torch_qkv_rope(x, w, qn, kn, cos, sin, t):
    """transformers' unfused sequence: projections, per-head norms, then rotate-half RoPE."""
    q, k, v = torch.nn.functional.linear(x, w).split([HQ * D, HKV * D, HKV * D], -1)
    q, k = torch_rms_norm(q.view(t, HQ, D), qn), torch_rms_norm(k.view(t, HKV, D), kn)

    def rope(u):
        a, b = u[..., : D // 2], u[..., D // 2:]
        return u * cos + torch.cat([-b, a], -1) * sin

    return rope(q), rope(k), v.view(t, HKV, D)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    bw = copy_bandwidth()
    ops = torch.ops.qwen3_aot
    rows = []
    cs = rope_cos_sin(D, 1e6, 8192, dev)
    for t in TOKENS:
        def inputs():
            return (torch.randn(t, H, device=dev, dtype=dt), torch.randn(t, H, device=dev, dtype=dt),
                    torch.randn(H, device=dev, dtype=dt))

        def norm_calls(ours: bool, residual: bool):
            x, r, w = inputs()
            if residual:
                return (lambda: ops.add_rms_norm(x, r, w, EPS)) if ours else (lambda: torch_rms_norm(x + r, w))
            return (lambda: ops.rms_norm(x, w, EPS)) if ours else (lambda: torch_rms_norm(x, w))

        for name, residual, nbytes in (("rms_norm", False, 2 * t * H * 2), ("add_rms_norm", True, 4 * t * H * 2)):
            rows.append(dict(op=name, tokens=t, bytes=nbytes,
                             ours=replayed_call_seconds(lambda: norm_calls(True, residual), nbytes),
                             torch=replayed_call_seconds(lambda: norm_calls(False, residual), nbytes)))

        wq = torch.randn((HQ + 2 * HKV) * D, H, device=dev, dtype=dt) / 32
        qn, kn = torch.rand(D, device=dev, dtype=dt), torch.rand(D, device=dev, dtype=dt) * 96
        nbytes = (wq.numel() + t * H + 2 * t * (HQ + 2 * HKV) * D) * 2

        def qkv_calls(ours: bool):
            x = torch.randn(t, H, device=dev, dtype=dt)
            pos = torch.randint(0, 8192, (t,), device=dev)
            if ours:
                return lambda: ops.qkv_rope(x, wq, qn, kn, cs, pos, HQ, HKV, EPS)
            cos = cs[pos][:, None, : D // 2].repeat(1, 1, 2).to(dt)
            sin = cs[pos][:, None, D // 2:].repeat(1, 1, 2).to(dt)
            return lambda: torch_qkv_rope(x, wq, qn, kn, cos, sin, t)

        rows.append(dict(op="qkv_rope", tokens=t, bytes=nbytes,
                         ours=replayed_call_seconds(lambda: qkv_calls(True), nbytes),
                         torch=replayed_call_seconds(lambda: qkv_calls(False), nbytes)))
    info = dict(**system_info(), copy_bandwidth_GBps=bw / 1e9, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    print(f"\n{info['gpu']}, torch {info['torch']}, triton {info['triton']}, bf16, hidden {H}, "
          f"heads {HQ}/{HKV}x{D}; copy bandwidth {bw / 1e9:.0f} GB/s (read+write)")
    print(f"{'op':<13}{'tokens':>7}{'ours us':>10}{'torch us':>10}{'speedup':>9}{'% of bw':>9}")
    for r in rows:
        print(f"{r['op']:<13}{r['tokens']:>7}{r['ours'] * 1e6:>10.1f}{r['torch'] * 1e6:>10.1f}"
              f"{r['torch'] / r['ours']:>8.2f}x{100 * r['bytes'] / r['ours'] / bw:>8.0f}%")


if __name__ == "__main__":
    main()
