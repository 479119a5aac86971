"""Projections with FP8 (e4m3) weights in blocks of 128 inputs, each row of a block with its scale.

``fp8_linear(x, w, w_scale, act_quant, block_scales=False) -> y``
    x: [M, K] bf16/fp16/fp32; w: [N, K] float8_e4m3fn (as nn.Linear stores it);
    w_scale: [N, ceil(K / 128)] fp32, the scale of w[n, 128 j : 128 (j + 1)];
    block_scales: the caller's promise that w_scale is one scale per 128x128 block, repeated
    over the block's rows (quantization.rows_repeat_by_block); it changes no result, only
    which GEMM may run;
    y: [M, N], dtype of x.
    W[n, k] = w[n, k] * w_scale[n, k // 128]                       (the dequantized weight)
    act_quant False (weight-only): y = x @ W.T, products summed in fp32, rounded once.
    act_quant True (dynamic per-token-group activations, Qwen's `activation_scheme: dynamic`):
        each row's group of 128 inputs g is quantized on its own,
        s[m, g] = amax |x[m, g]| / 448 (1 for an all-zero group),
        q[m, k] = fp8(clamp(x[m, k] / s[m, k // 128], -448, 448)) rounded to nearest,
        X[m, k] = q[m, k] * s[m, k // 128], then y = X @ W.T as above.

Why a scale per row of a block: a checkpoint's 128x128 block scale (Qwen's `weight_scale_inv`)
is that block's 128 rows' scale, repeated; per-channel and per-tensor scales (compressed-tensors)
are the same repeated along K. So every format the loader reads is one layout, and q/k/v or
gate/up fuse by concatenating rows, scales included, whatever their sizes (a block of 128
rows may straddle two parts). It costs 4 bytes per 128 weight bytes (3%) over one scale a block.

Kernels (CUDA sm_89+, or CPU under TRITON_INTERPRET=1):
- rows (weight-only), for a few rows: as custom_ops/small_linear.py, a program owns one row of
  x and BLOCK_N output columns and streams their FP8 weight rows once, dequantizing in
  registers: a decode step reads 1 byte a weight instead of 2. Up to ROWS_KERNEL_MAX rows.
- tiles (weight-only), for more rows (an FP8 artifact's small-batch graph decodes batches up to
  64 with it): a program owns 32 output columns of up to 64 rows, so each weight is read once,
  and converts each group of 128 FP8 weights to x's dtype in registers for the tensor cores
  (exact: e4m3 values are bf16 values; fp32 sums), the group's partial sums times the column's
  scale. Weight bytes still bound decode at 64 rows, where activation quantization would add a
  kernel and its error.
- GEMM (act_quant), for many rows (prefill, large decode batches): one kernel quantizes the
  activations per (row, group of 128) as above, then the tiles kernel takes FP8 x FP8 products on
  the tensor cores one group of 128 at a time, scaling each group's fp32 partial sums by the
  row's activation scale times the column's weight scale. Hopper's FP8 tensor cores sum a
  group's 128 products with about 14 significant bits, not fp32's 24 (DeepSeek-V3's report,
  section 3.3.2; measured on an H200: fp32 outputs 1e-4 from float64 where the plain fp32
  reference is 3e-7): under bf16's rounding of the output, but not fp32's. So fp32 inputs
  take the group's products in fp16 (FP8 values are exact in it; the sums fp32), the
  dtypes served take FP8 x FP8. One group at a time keeps that short sum: the fp32
  accumulator takes each group's partial, as DeepSeek-V3 promotes every 128.
- cuBLAS's block-scaled FP8 GEMM (torch._scaled_mm with 1x128 activation scales and 128x128
  weight scales, cuBLASLt 12.9+ on sm_90) in place of the Triton GEMM where it can read the
  weights' scales: block_scales, bf16 x (the dtype served; torch tests this form's bf16 and
  fp32 outputs, not fp16), N a multiple of 128 and K of 512 (its scales' leading dimension
  must be a multiple of 4). The activations are quantized by the same
  kernel, its scales written column-major as cuBLAS reads them; the weight's block scales are
  every 128th row of w_scale. Chosen at build time by QWEN3_AOT_FP8_GEMM=cublas; the
  default stays the Triton GEMM until this path has run on an sm_90 GPU (its tests there,
  tests/custom_ops/test_fp8_linear.py, and its figures in BENCHMARKS.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from qwen3_aot.custom_ops.dependent_launch import enabled as dependent_launch_enabled
from qwen3_aot.custom_ops.dependent_launch import wait_for_earlier_kernels
from qwen3_aot.quantization import FP8, FP8_MAX, GROUP  # noqa: F401  (the layout's constants; FP8 for callers)

# cuBLAS's path: activation rows padded to a multiple of this (see fp8_gemm_cublas)
CUBLAS_ROWS = 16
# rows kernel: weight elements a program holds at once, and its warps (any values are correct)
ROWS_TILE, ROWS_WARPS = 8192, 4
# weight-only: the rows kernel up to this many rows (each row's programs reread the weights,
# from L2), the tiles kernel above (an FP8 artifact's small-batch graph runs decode batches to 64)
ROWS_KERNEL_MAX = 4
# tiles kernel: a decode batch's rows in one tile, so each weight tile is read once (the
# small-batch graph's largest batch, build/pipeline.py); 32 columns so that a 4096-wide
# projection still spreads over 128 programs (the GPU has 132 SMs); bench/fp8_bench.py times others
TILES_BLOCK_M, TILES_BLOCK_N, TILES_WARPS, TILES_STAGES = 64, 32, 4, 4
# GEMM tile (BLOCK_K is GROUP: one scale per row and column of a tile). Fixed, since the row
# count is symbolic in the exported graph; 64 columns so that a decode batch of 64 rows still
# spreads a 4096-wide projection over 64 programs (the GPU has 132 SMs)
GEMM_BLOCK_M, GEMM_BLOCK_N, GEMM_WARPS, GEMM_STAGES = 64, 64, 4, 4


@triton.jit
def _fp8_rows_chunk(acc, w, s, x_row, k, K, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    """One chunk of GROUPS groups: the row's inputs times the weights, each group's sums times its scale."""
    x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
    part = tl.sum(tl.reshape(w.to(tl.float32) * x[None, :], [BLOCK_N, GROUPS, 128]), axis=2)
    return acc + tl.sum(part * s, axis=1)


@triton.jit
def _fp8_rows_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, KB, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                     PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    kk = tl.arange(0, GROUPS * 128)
    jj = tl.arange(0, GROUPS)
    w_rows, s_rows = w_ptr + n.to(tl.int64)[:, None] * K, s_ptr + n.to(tl.int64)[:, None] * KB
    # the first chunk's weights and scales are constants: loaded before the wait of dependent
    # launch (custom_ops/dependent_launch.py), they overlap the tail of the kernel ahead
    w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & (kk < K)[None, :], other=0.0)
    s = tl.load(s_rows + jj[None, :], mask=n_ok[:, None] & (jj < KB)[None, :], other=0.0)
    x_row = x_ptr + row * K
    if PDL:
        x_row += wait_for_earlier_kernels()
    acc = _fp8_rows_chunk(tl.zeros([BLOCK_N], tl.float32), w, s, x_row, kk, K, BLOCK_N, GROUPS)
    for kb0 in range(GROUPS, KB, GROUPS):
        k = kb0 * 128 + kk
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
        s = tl.load(s_rows + (kb0 + jj)[None, :], mask=n_ok[:, None] & (kb0 + jj < KB)[None, :], other=0.0)
        acc = _fp8_rows_chunk(acc, w, s, x_row, k, K, BLOCK_N, GROUPS)
    tl.store(y_ptr + row * N + n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _round_to_e4m3(v):
    """v (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, still in fp32: the
    conversion to FP8 after it is exact. Done by hand because the Triton interpreter's
    fp32 -> fp8 conversion drops a rounding's carry into the exponent (124.3 became 64)."""
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step = tl.maximum(e, -6) - 3  # log2 of the e4m3 spacing at v: 3 mantissa bits; subnormals below 2^-6
    ulp = ((step + 127) << 23).to(tl.float32, bitcast=True)
    y = v * ((127 - step) << 23).to(tl.float32, bitcast=True)  # v / ulp, exact (a power of two), |y| < 16
    return ((y + 12582912.0) - 12582912.0) * ulp  # 1.5 * 2^23: fp32 addition rounds y to an integer, ties to even


@triton.jit
def _quantize_groups_kernel(x_ptr, q_ptr, s_ptr, M, K, S_ROW, S_GROUP):
    """One program per (row, group of 128): the group's scale and its FP8 values; rows from M
    on (padding) read as zeros, so they are written as zeros with scale 1."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    k = g * 128 + tl.arange(0, 128)
    k_ok = k < K
    x = tl.load(x_ptr + row * K + k, mask=k < tl.where(row < M, K, 0), other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    # div_rn: correctly rounded, as torch divides (Triton's `/` on CUDA is approximate, 2 ulp)
    s = tl.where(amax > 0, tl.div_rn(amax, 448.0), 1.0)
    q = tl.minimum(tl.maximum(tl.div_rn(x, s), -448.0), 448.0)
    tl.store(q_ptr + row * K + k, _round_to_e4m3(q).to(q_ptr.dtype.element_ty), mask=k_ok)
    tl.store(s_ptr + row * S_ROW + g * S_GROUP, s)


@triton.jit
def _fp8_tiles_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, y_ptr, M, N, K, KB, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, ACT_QUANT: tl.constexpr, PRECISE: tl.constexpr, PDL: tl.constexpr):
    """Program (BLOCK_N columns, BLOCK_M rows) on the tensor cores, one group of 128 inputs at a
    time, each group's fp32 partial sums times its scales (its columns' weight scales, and with
    ACT_QUANT its rows' activation scales).
    ACT_QUANT: a is the quantized activations (FP8, scales as_ptr): FP8 x FP8 products, or with
    PRECISE (fp32 x) fp16 x fp16 ones (e4m3 values are fp16 values: exact products).
    Weight-only: a is x, each group of FP8 weights converted to x's dtype in registers (exact
    in bf16, fp16 and fp32); PRECISE: products in fp32, not rounded to tf32: for fp32 x, and
    under the CPU interpreter (its bf16 dot returns garbage, Triton 3.9), where they are as
    exact as the tensor cores' bf16 products. PDL: it waits for the kernels ahead first
    (dependent launch: its launch overlaps their tail)."""
    if PDL:
        ready = wait_for_earlier_kernels()
        a_ptr += ready
        as_ptr += ready
    # rows on the fast grid axis: the programs of one weight tile run together and share it in L2
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    m64, n64 = m.to(tl.int64), n.to(tl.int64)
    kk = tl.arange(0, 128)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(0, KB):
        k = kb * 128 + kk
        k_ok = k < K
        a = tl.load(a_ptr + m64[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + n64[None, :] * K + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        sb = tl.load(ws_ptr + n64 * KB + kb, mask=n_ok, other=0.0)
        if ACT_QUANT:
            sa = tl.load(as_ptr + m64 * KB + kb, mask=m_ok, other=0.0)
            if PRECISE:
                a, b = a.to(tl.float16), b.to(tl.float16)
            acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
        elif PRECISE:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee") * sb[None, :]
        else:
            acc += tl.dot(a, b.to(tl.float32).to(a.dtype)) * sb[None, :]
    tl.store(y_ptr + m64[:, None] * N + n64[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def rows_launch_parameters(k: int) -> tuple[int, int]:
    """(BLOCK_N, GROUPS): a program's weight tile is BLOCK_N rows of GROUPS groups of 128."""
    groups = min(triton.next_power_of_2(triton.cdiv(k, GROUP)), 16)
    return max(1, min(32, ROWS_TILE // (groups * GROUP))), groups


def at_least(m: int | torch.SymInt, lo: int) -> int | torch.SymInt:
    """1 where m >= lo, else 0 (for 0 < m < 2**40), in integer arithmetic alone: a graph carries it
    for a symbolic row count without a guard (a Python comparison would specialise the graph)."""
    return (m - lo + (1 << 40)) // (1 << 40)


def fp8_weight_only_triton(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                           block_n: int = TILES_BLOCK_N, stages: int = TILES_STAGES) -> torch.Tensor:
    """Weight-only, the Triton path (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1): the
    rows kernel for up to ROWS_KERNEL_MAX rows, the tiles kernel above. The row count is symbolic
    in a graph, so both are launched, each with a grid of 0 programs where the other one runs:
    a grid of 0 launches nothing (Triton's launcher and AOTInductor's both return first).
    block_n, stages: the tiles kernel's (the benchmark tries others; any values are correct)."""
    (m, k), n = x.shape, w.shape[0]
    x = x.contiguous()
    y = x.new_empty(m, n)
    block_n_rows, groups = rows_launch_parameters(k)
    pdl = dependent_launch_enabled(x.device)
    tiles = at_least(m, ROWS_KERNEL_MAX + 1)
    wrap_triton(_fp8_rows_kernel)[(m * (1 - tiles), triton.cdiv(n, block_n_rows))](
        x, w, w_scale, y, n, k, w_scale.shape[1], BLOCK_N=block_n_rows, GROUPS=groups, PDL=pdl, num_warps=ROWS_WARPS)
    wrap_triton(_fp8_tiles_kernel)[(triton.cdiv(m, TILES_BLOCK_M) * tiles, triton.cdiv(n, block_n))](
        x, x, w, w_scale, y, m, n, k, w_scale.shape[1], BLOCK_M=TILES_BLOCK_M, BLOCK_N=block_n, ACT_QUANT=False,
        PRECISE=x.dtype == torch.float32 or x.device.type == "cpu", PDL=pdl, num_warps=TILES_WARPS,
        num_stages=stages)
    return y


def quantize_groups_triton(x: torch.Tensor, column_major: bool = False,
                           rows: int | torch.SymInt | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [R, K] float8_e4m3fn, s [R, ceil(K / 128)] fp32), as the docstring says,
    R = rows (default M; rows past M are zeros, scale 1); column_major: s's groups outermost in
    memory (s.t() contiguous), as cuBLAS reads them."""
    m, k = x.shape
    r = m if rows is None else rows
    kb = triton.cdiv(k, GROUP)
    x = x.contiguous()
    q = torch.empty(r, k, dtype=FP8, device=x.device)
    s = torch.empty(kb, r, dtype=torch.float32, device=x.device).t() if column_major else \
        torch.empty(r, kb, dtype=torch.float32, device=x.device)
    wrap_triton(_quantize_groups_kernel)[(r, kb)](x, q, s, m, k, s.stride(0), s.stride(1), num_warps=1)
    return q, s


def fp8_gemm_triton(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Dynamic activation quantization and the block-scaled FP8 GEMM (the Triton path)."""
    (m, k), n = x.shape, w.shape[0]
    q, s = quantize_groups_triton(x)
    y = x.new_empty(m, n)
    wrap_triton(_fp8_tiles_kernel)[(triton.cdiv(m, GEMM_BLOCK_M), triton.cdiv(n, GEMM_BLOCK_N))](
        q, s, w, w_scale, y, m, n, k, w_scale.shape[1], BLOCK_M=GEMM_BLOCK_M, BLOCK_N=GEMM_BLOCK_N, ACT_QUANT=True,
        PRECISE=x.dtype == torch.float32, PDL=dependent_launch_enabled(x.device), num_warps=GEMM_WARPS,
        num_stages=GEMM_STAGES)
    return y


def cublas_gemm_chosen(device: torch.device, dtype: torch.dtype, w_shape: Sequence[int], act_quant: bool,
                       block_scales: bool) -> bool:
    """Whether the op runs cuBLAS's block-scaled GEMM for activations of `dtype` on `device` and
    a weight of `w_shape`, as the docstring says (the build's manifest asks the same)."""
    n, k = w_shape
    return (act_quant and block_scales and n % GROUP == 0 and k % (4 * GROUP) == 0 and device.type == "cuda"
            and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) == (9, 0)
            and os.environ.get("QWEN3_AOT_FP8_GEMM") == "cublas")


def fp8_gemm_cublas(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Dynamic activation quantization and cuBLAS's block-scaled FP8 GEMM; w_scale repeats by
    blocks of 128 rows, so its every 128th row is the [N/128, K/128] block scale, which cuBLAS
    takes transposed (as it takes w). The rows are padded to a multiple of CUBLAS_ROWS: torch
    wants the activation scales' stride exactly the row count, and cuBLASLt finds no algorithm
    for one row (CUBLAS_STATUS_NOT_SUPPORTED on an H100, cuBLASLt 13.1); padded rows are zeros
    and their outputs are dropped. torch also refuses a strided view of the block scales, hence
    the copy."""
    m = x.shape[0]
    q, s = quantize_groups_triton(x, column_major=True, rows=(m + CUBLAS_ROWS - 1) // CUBLAS_ROWS * CUBLAS_ROWS)
    return torch._scaled_mm(q, w.t(), s, w_scale[::GROUP].contiguous().t(), out_dtype=x.dtype)[:m]


def fp8_linear_triton(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, act_quant: bool) -> torch.Tensor:
    return fp8_gemm_triton(x, w, w_scale) if act_quant else fp8_weight_only_triton(x, w, w_scale)


def _per_input(scale: torch.Tensor, k: int) -> torch.Tensor:
    """[R, ceil(K / 128)] group scales -> [R, K], each repeated over its group's inputs."""
    return scale.repeat_interleave(GROUP, dim=1)[:, :k]


def dequantize(w: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W = w * w_scale per row and group, in `dtype` (float64: exact, an e4m3 value times an fp32 scale)."""
    return w.to(dtype) * _per_input(w_scale, w.shape[1]).to(dtype)


def quantize_groups_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation quantization of the docstring, in fp32: (q, s)."""
    m, k = x.shape
    groups = -(-k // GROUP)
    padded = torch.nn.functional.pad(x.float(), (0, groups * GROUP - k)).view(m, groups, GROUP)
    amax = padded.abs().amax(-1)
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x.float() / _per_input(s, k)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, s


def fp8_linear_reference(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, act_quant: bool,
                         block_scales: bool = False) -> torch.Tensor:
    """Plain torch: dequantize and multiply in fp32, rounded once to x.dtype (float64 x: the
    float64 oracle of the same definition; its activation quantization is still the fp32 one).
    block_scales changes nothing here: the scales already say what they are."""
    c = torch.float64 if x.dtype == torch.float64 else torch.float32
    if act_quant:
        q, s = quantize_groups_reference(x)
        xc = dequantize(q, s, c)
    else:
        xc = x.to(c)
    return torch.nn.functional.linear(xc, dequantize(w, w_scale, c)).to(x.dtype)


@triton_op("qwen3_aot::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, act_quant: bool,
               block_scales: bool = False) -> torch.Tensor:
    if cublas_gemm_chosen(x.device, x.dtype, w.shape, act_quant, block_scales):
        return fp8_gemm_cublas(x, w, w_scale)
    return fp8_linear_triton(x, w, w_scale, act_quant)


fp8_linear.register_kernel("cpu")(fp8_linear_reference)


@fp8_linear.register_fake
def _(x, w, w_scale, act_quant, block_scales=False):
    return x.new_empty(x.shape[0], w.shape[0])
