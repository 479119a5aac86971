"""paged_attention on the GPU (issue 3): decode against the bandwidth floor, prefill against SDPA.

Qwen3-0.6B's head layout (16 query heads, 8 kv heads, head_dim 128), bf16, block size 16,
blocks handed out in a shuffled order. Times are medians of CUDA-graph replays
(bench_support.replayed_call_seconds), the cache write included.
- decode: one new token per sequence, every sequence with the same context; achieved
  bandwidth = bytes of K and V read / time, against the measured copy bandwidth.
- prefill: B sequences of N new tokens from position 0; against
  torch.nn.functional.scaled_dot_product_attention with the flash backend on the same
  q/k/v, contiguous [B, H, N, D] (k and v expanded to the 16 query heads beforehand).
- mixed: one call that decodes a batch and prefills a prompt, against the two run apart and
  against the same call with every token in the prefill tiles (SPLIT_TOKENS = 0).

    PYTHONPATH=src python bench/attention_bench.py --json $OUT/attention.json
    PYTHONPATH=src python bench/attention_bench.py --sweep     # the goal shapes over the launch parameters
    ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
        -k regex:"_split|_combine|_tile" python3 bench/attention_bench.py --once    # the goal shapes, one call each
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from bench_support import copy_bandwidth, replayed_call_seconds, system_info  # noqa: E402

import qwen3_aot.custom_ops  # noqa: E402,F401
from qwen3_aot.custom_ops import paged_attention as attention_module  # noqa: E402

HQ, HKV, D, BS = 16, 8, 128, 16
DT = torch.bfloat16
DECODE_BATCHES, DECODE_CONTEXTS = [1, 8, 64, 256], [512, 4096, 32768]
PREFILL_LENGTHS, PREFILL_BATCHES = [512, 2048, 8192], [1, 8]


def paged_inputs(batch: int, prior: int, new: int, gen: torch.Generator) -> tuple:
    """Caches holding `prior` tokens per sequence (shuffled blocks), and `new` tokens per sequence."""
    return varlen_inputs([prior] * batch, [new] * batch, gen)


def varlen_inputs(prior: list[int], new: list[int], gen: torch.Generator) -> tuple:
    """Sequence s holds prior[s] cached tokens and brings new[s] tokens; blocks in shuffled order."""
    per_seq = [-(-(p + n) // BS) for p, n in zip(prior, new)]
    num_blocks = sum(per_seq) + 1
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).to(torch.int32)
    table = torch.zeros(len(prior), max(per_seq), dtype=torch.int32)
    for s, start in enumerate(torch.tensor([0] + per_seq).cumsum(0)[:-1].tolist()):
        table[s, :per_seq[s]] = order[start:start + per_seq[s]]
    k_cache = torch.randn(num_blocks, BS, HKV, D, device="cuda", dtype=DT) * 30  # K near Qwen3's ~220 scale
    v_cache = torch.randn(num_blocks, BS, HKV, D, device="cuda", dtype=DT)
    t = sum(new)
    q = torch.randn(t, HQ, D, device="cuda", dtype=DT)
    k = torch.randn(t, HKV, D, device="cuda", dtype=DT) * 30
    v = torch.randn(t, HKV, D, device="cuda", dtype=DT)
    positions = torch.cat([torch.arange(p, p + n) for p, n in zip(prior, new)]).cuda()
    seq_ids = torch.cat([torch.full((n,), s, dtype=torch.int32) for s, n in enumerate(new)]).cuda()
    return q, k, v, k_cache, v_cache, positions, seq_ids, table.cuda(), D ** -0.5


def mixed_seconds(decodes: int, ctx: int, prompt: int, gen: torch.Generator) -> dict:
    """A step that decodes `decodes` sequences at `ctx` and prefills one `prompt`-token sequence,
    against the same two batches run apart."""
    attention = torch.ops.qwen3_aot.paged_attention

    def timed(prior: list[int], new: list[int]) -> float:
        def call():
            a = varlen_inputs(prior, new, gen)
            return lambda: attention(*a)
        return replayed_call_seconds(call, 2 * (sum(prior) + sum(new)) * HKV * D * DT.itemsize)

    mixed = ([ctx - 1] * decodes + [0], [1] * decodes + [prompt])
    both = timed(*mixed)
    apart = timed([ctx - 1] * decodes, [1] * decodes) + timed([0], [prompt])
    split_tokens, attention_module.SPLIT_TOKENS = attention_module.SPLIT_TOKENS, 0
    try:
        tiles = timed(*mixed)  # every token in the tiles, as a large batch's decodes were until 2026-12-01
    finally:
        attention_module.SPLIT_TOKENS = split_tokens
    return dict(decodes=decodes, context=ctx, prompt=prompt, mixed_us=both * 1e6, apart_us=apart * 1e6,
                tiles_only_us=tiles * 1e6)


def decode_seconds(b: int, ctx: int, gen: torch.Generator) -> float:
    attention = torch.ops.qwen3_aot.paged_attention

    def call():
        a = paged_inputs(b, ctx - 1, 1, gen)
        return lambda: attention(*a)

    return replayed_call_seconds(call, 2 * b * ctx * HKV * D * DT.itemsize)


def sweep(bw: float, gen: torch.Generator) -> None:
    """The goal shapes over the op's launch parameters (module constants, restored after)."""
    saved = {k: getattr(attention_module, k) for k in ("SPLIT_PROGRAMS", "KEYS_PER_STEP", "SPLIT_STAGES",
                                                       "TILE_STAGES")}
    print(f"{'SPLIT_PROGRAMS':>15}{'keys':>5}{'stages':>7}{'batch':>6}{'context':>8}{'us':>9}{'% of bw':>9}")
    for programs in (512, 1024, 2048):
        for keys in (64, 128):
            for stages in (2, 3):
                for k, v in (("SPLIT_PROGRAMS", programs), ("KEYS_PER_STEP", keys), ("SPLIT_STAGES", stages)):
                    setattr(attention_module, k, v)
                for b, ctx in ((1, 32768), (64, 4096)):
                    seconds = decode_seconds(b, ctx, gen)
                    pct = 100 * 2 * b * ctx * HKV * D * DT.itemsize / seconds / bw
                    print(f"{programs:>15}{keys:>5}{stages:>7}{b:>6}{ctx:>8}{seconds * 1e6:>9.1f}{pct:>8.0f}%",
                          flush=True)
    attention_module.SPLIT_PROGRAMS = saved["SPLIT_PROGRAMS"]
    print(f"{'prefill keys':>15}{'stages':>7}{'batch':>6}{'tokens':>8}{'ours us':>9}{'SDPA us':>9}{'ratio':>7}")
    for b, n in ((1, 2048), (1, 8192), (8, 2048)):
        t_sdpa = prefill_seconds(b, n, gen)[1]
        for keys in (64, 128):
            for stages in (2, 3):
                attention_module.KEYS_PER_STEP, attention_module.TILE_STAGES = keys, stages
                t_ours = prefill_seconds(b, n, gen, sdpa=False)[0]
                print(f"{keys:>15}{stages:>7}{b:>6}{n:>8}{t_ours * 1e6:>9.1f}{t_sdpa * 1e6:>9.1f}"
                      f"{t_ours / t_sdpa:>6.2f}x", flush=True)
    for k, v in saved.items():
        setattr(attention_module, k, v)


def prefill_seconds(b: int, n: int, gen: torch.Generator, sdpa: bool = True) -> tuple[float, float | None]:
    """(ours, SDPA flash) seconds for b sequences of n new tokens from position 0."""
    attention = torch.ops.qwen3_aot.paged_attention
    nbytes = 4 * b * n * HQ * D * DT.itemsize

    def ours():
        a = paged_inputs(b, 0, n, gen)
        return lambda: attention(*a)

    def flash():
        q = torch.randn(b, HQ, n, D, device="cuda", dtype=DT)
        k = (torch.randn(b, HKV, n, D, device="cuda", dtype=DT) * 30).repeat_interleave(HQ // HKV, 1)
        v = torch.randn(b, HKV, n, D, device="cuda", dtype=DT).repeat_interleave(HQ // HKV, 1)

        def run():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D ** -0.5)
        return run

    return replayed_call_seconds(ours, nbytes), replayed_call_seconds(flash, nbytes) if sdpa else None


CACHED_SHAPES = [  # (sequences, cached tokens each, new tokens each): a multi-turn step over a cached prefix
    (64, 2000, 64), (64, 2448, 128), (8, 2000, 64), (1, 2000, 64), (1, 2000, 2048)]


def cached_prefill(gen: torch.Generator) -> list[dict]:
    """B sequences of N new tokens after P cached ones (a prefix-cache hit's step), against a
    full prefill of as many tokens (4 sequences from position 0, the same shape as the engine's
    chunks) and the attention's own work: query-key pairs computed over those of the full prefill."""
    attention = torch.ops.qwen3_aot.paged_attention
    rows = []
    for b, prior, new in CACHED_SHAPES:
        def call(prior=prior, new=new, b=b):
            a = varlen_inputs([prior] * b, [new] * b, gen)
            return lambda: attention(*a)
        seconds = replayed_call_seconds(call, 2 * b * (prior + new) * HKV * D * DT.itemsize)
        pairs = b * new * (prior + (new + 1) / 2)
        rows.append(dict(batch=b, cached=prior, new=new, us=seconds * 1e6,
                         pair_rate_G=pairs / seconds / 1e9))
        print(rows[-1], flush=True)
    full = prefill_seconds(1, 8192, gen, sdpa=False)[0]
    rows.append(dict(batch=1, cached=0, new=8192, us=full * 1e6, pair_rate_G=8192 * 8193 / 2 / full / 1e9))
    print(rows[-1], flush=True)
    return rows


def once(gen: torch.Generator) -> None:
    """One call of the op for each goal shape, for a profiler to catch: decode batch 1 at 32k and
    64 at 4k, prefill of 1 x 2k and 8k tokens (a first call compiles, so each runs twice)."""
    attention = torch.ops.qwen3_aot.paged_attention
    for b, prior, new in ((1, 32767, 1), (64, 4095, 1), (1, 0, 2048), (1, 0, 8192)):
        a = paged_inputs(b, prior, new, gen)
        for _ in range(2):
            attention(*a)
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="only the goal shapes over the launch parameters")
    ap.add_argument("--once", action="store_true", help="only one call per goal shape, for a profiler")
    ap.add_argument("--cached", action="store_true", help="only prefill over a cached prefix (prefix caching's steps)")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    if args.once:
        return once(gen)
    if args.cached:
        rows = cached_prefill(gen)
        print(f"{'batch':>6}{'cached':>8}{'new':>6}{'us':>10}{'G pairs/s':>11}")
        for r in rows:
            print(f"{r['batch']:>6}{r['cached']:>8}{r['new']:>6}{r['us']:>10.1f}{r['pair_rate_G']:>11.0f}")
        return None
    bw = copy_bandwidth()
    if args.sweep:
        return sweep(bw, gen)
    decode, prefill = [], []
    for ctx in DECODE_CONTEXTS:
        for b in DECODE_BATCHES:
            kv_bytes = 2 * b * ctx * HKV * D * DT.itemsize
            seconds = decode_seconds(b, ctx, gen)
            decode.append(dict(batch=b, context=ctx, us=seconds * 1e6, kv_GB=kv_bytes / 1e9,
                               bw_fraction=kv_bytes / seconds / bw))
            print(decode[-1], flush=True)
            torch.cuda.empty_cache()
    for n in PREFILL_LENGTHS:
        for b in PREFILL_BATCHES:
            t_ours, t_sdpa = prefill_seconds(b, n, gen)
            prefill.append(dict(batch=b, tokens=n, ours_us=t_ours * 1e6, sdpa_us=t_sdpa * 1e6,
                                ratio=t_ours / t_sdpa))
            print(prefill[-1], flush=True)
            torch.cuda.empty_cache()
    mixed = [mixed_seconds(256, 1024, 4096, gen), mixed_seconds(64, 1024, 2048, gen)]
    print(mixed, flush=True)
    info = dict(**system_info(), copy_bandwidth_GBps=bw / 1e9, decode=decode, prefill=prefill, mixed=mixed)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    print(f"\n{info['gpu']}, torch {info['torch']}, triton {info['triton']}, bf16, heads {HQ}/{HKV}x{D}, "
          f"block size {BS}; copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"{'decode':<8}{'batch':>6}{'context':>8}{'us':>10}{'K/V GB':>8}{'% of bw':>9}")
    for r in decode:
        print(f"{'':<8}{r['batch']:>6}{r['context']:>8}{r['us']:>10.1f}{r['kv_GB']:>8.3f}{100 * r['bw_fraction']:>8.0f}%")
    print(f"{'prefill':<8}{'batch':>6}{'tokens':>8}{'ours us':>10}{'SDPA us':>10}{'ours/SDPA':>10}")
    for r in prefill:
        print(f"{'':<8}{r['batch']:>6}{r['tokens']:>8}{r['ours_us']:>10.1f}{r['sdpa_us']:>10.1f}{r['ratio']:>9.2f}x")
    print(f"{'mixed':<8}{'decodes':>8}{'context':>8}{'prompt':>7}{'one call us':>12}{'apart us':>10}"
          f"{'tiles only us':>14}")
    for r in mixed:
        print(f"{'':<8}{r['decodes']:>8}{r['context']:>8}{r['prompt']:>7}{r['mixed_us']:>12.1f}{r['apart_us']:>10.1f}"
              f"{r['tiles_only_us']:>14.1f}")


if __name__ == "__main__":
    main()
