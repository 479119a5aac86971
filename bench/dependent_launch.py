"""Programmatic dependent launch on a chain of small-batch projections, in one CUDA graph.

The chain is the four projections of 28 Qwen3-0.6B layers at one row (qkv with its norm, o,
gate_up with its norm and silu*up, down; each layer its own weights, 0.88 GB in all, so every
replay reads them from memory), captured once as captured and once with the edges into them
made programmatic (runtime/forward/dependent_launch.py). Both replay the same inputs: outputs must be
bitwise equal (a kernel that read its input before its wait would differ); times are medians
of replays taken in turn, against the floor of the weights' bytes over the copy bandwidth.

    PYTHONPATH=src python bench/dependent_launch.py [--rows 1] [--json $OUT/dependent_launch.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_support import copy_bandwidth, replay_seconds, system_info  # noqa: E402

from qwen3_aot.custom_ops import small_linear as small  # noqa: E402
from qwen3_aot.custom_ops.dependent_launch import DEPENDENT_KERNELS  # noqa: E402
from qwen3_aot.runtime.forward.dependent_launch import link_dependents  # noqa: E402

HIDDEN, QKV, O_IN, INTER, LAYERS, EPS = 1024, 4096, 2048, 3072, 28, 1e-6


def make_chain(rows: int):
    dt, dev = torch.bfloat16, "cuda"

    def weight(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5

    layers = [(weight(QKV, HIDDEN), weight(HIDDEN, O_IN), weight(2 * INTER, HIDDEN), weight(HIDDEN, INTER),
               torch.rand(HIDDEN, device=dev, dtype=dt) + 0.5, torch.rand(HIDDEN, device=dev, dtype=dt) + 0.5)
              for _ in range(LAYERS)]
    x, r = torch.randn(rows, HIDDEN, device=dev, dtype=dt), torch.randn(rows, HIDDEN, device=dev, dtype=dt)

    def chain() -> torch.Tensor:
        h, s = x, r
        for w_qkv, w_o, w_gu, w_down, n1, n2 in layers:
            qkv, s = small.add_rms_norm_linear_triton(h, s, n1, w_qkv, EPS, False)
            o = small.small_linear_triton(qkv[:, :O_IN].contiguous(), w_o)
            act, s = small.add_rms_norm_linear_triton(o, s, n2, w_gu, EPS, True)
            h = small.small_linear_triton(act, w_down)
        return h + s

    nbytes = sum(sum(t.numel() * t.element_size() for t in layer[:4]) for layer in layers)
    return chain, (x, r), nbytes


def capture(chain, link: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, int]:
    chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(graph):
        out = chain()
    edges = link_dependents(graph, DEPENDENT_KERNELS) if link else 0
    graph.instantiate()
    return graph, out, edges


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    results = []
    for rows in args.rows:
        chain, (x, r), nbytes = make_chain(rows)
        plain, out_plain, _ = capture(chain, link=False)
        linked, out_linked, edges = capture(chain, link=True)
        for trial in range(20):  # fresh inputs each time; both graphs read the same buffers
            x.normal_()
            r.normal_()
            plain.replay()
            linked.replay()
            torch.cuda.synchronize()
            assert torch.equal(out_plain, out_linked), f"outputs differ at {rows} rows, trial {trial}"
        rounds = [(replay_seconds(plain, 50), replay_seconds(linked, 50)) for _ in range(5)]
        t_plain = statistics.median(t[0] for t in rounds)
        t_linked = statistics.median(t[1] for t in rounds)
        results.append(dict(rows=rows, edges_linked=edges, bytes=nbytes,
                            plain_s=t_plain, linked_s=t_linked, floor_s=nbytes / bw))
    info = dict(**system_info(), copy_bandwidth_GBps=bw / 1e9, results=results)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    print(f"\n{info['gpu']}, torch {info['torch']} (CUDA {info['cuda']}), triton {info['triton']}, bf16; copy "
          f"bandwidth {bw / 1e9:.0f} GB/s; 28 layers x 4 projections of the Qwen3-0.6B shape; outputs bitwise equal")
    print(f"{'rows':>5}{'edges':>7}{'as captured us':>16}{'dependent us':>14}{'saved us':>10}{'floor us':>10}"
          f"{'per edge us':>13}")
    for r in results:
        saved = r["plain_s"] - r["linked_s"]
        print(f"{r['rows']:>5}{r['edges_linked']:>7}{r['plain_s'] * 1e6:>16.1f}{r['linked_s'] * 1e6:>14.1f}"
              f"{saved * 1e6:>10.1f}{r['floor_s'] * 1e6:>10.1f}{saved * 1e6 / max(1, r['edges_linked']):>13.2f}")


if __name__ == "__main__":
    main()
