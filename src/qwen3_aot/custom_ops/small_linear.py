"""Projections of a few rows (small decode batches), with the RMSNorm before them fused in.

``small_linear(x, w) -> y``
    x: [M, K], w: [N, K] (as nn.Linear stores it), same dtype; y: [M, N]
    y = x @ w.T, products accumulated in fp32, rounded once.

``rms_norm_linear(x, norm_weight, w, eps, silu_mul) -> y``
    y = small_linear(rms_norm(x, norm_weight, eps), w), the norm exactly as the rms_norm
    op computes it (fp32, rounded once to x.dtype before the product);
    with silu_mul, w is [2N, K] (gate rows, then up rows, as gate_up_proj stacks them)
    and y = silu(g) * u, where g and u are the two products each rounded to x.dtype (as
    F.linear returns them) and silu(g) * u is computed in fp32 and rounded once.

``add_rms_norm_linear(x, residual, norm_weight, w, eps, silu_mul) -> (y, s)``
    s = x + residual rounded to x.dtype (the residual stream, as add_rms_norm gives it),
    then y as rms_norm_linear of s.

Why: at batch 1 a Qwen3-0.6B decode step ran 342 kernels, each projection read its 4-12 MB
of weights in a launch that cuBLAS tiles for large M (8% to 50% of the bandwidth at one
row) and each norm paid a launch of its own. Here a program owns one row of x and BLOCK_N
output columns and streams their weight rows once, in as few chunks of K as fit; every
program recomputes its row's norm (a few KB, from L2) rather than waiting for a kernel of
its own. A weight tile is read from memory by the first of its rows' programs and from L2
by the others, so the cost grows with M: this is for the few rows of small decode batches.
The row count is symbolic in the exported graph; the launch depends on the weight's shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from qwen3_aot.custom_ops.dependent_launch import enabled as dependent_launch_enabled
from qwen3_aot.custom_ops.dependent_launch import wait_for_earlier_kernels

# Launch parameters (any values are correct): how many weight elements one program holds at a
# time, and its warps (bench/small_linear.py sweeps both on the GPU)
TILE_ELEMENTS, WARPS = 4096, 4


@triton.jit
def _accumulate(acc, acc_up, w, w_up, x_row, r_row, nw_ptr, k, K, inv_rms, dt: tl.constexpr, NORM: tl.constexpr,
                RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr):
    """One chunk of K: the row's inputs (normed as the norm op rounds them) times the weight tile."""
    k_ok = k < K
    h = tl.load(x_row + k, mask=k_ok, other=0.0)
    if NORM:
        if RESIDUAL:
            h = (h.to(tl.float32) + tl.load(r_row + k, mask=k_ok, other=0.0).to(tl.float32)).to(dt)
        nw = tl.load(nw_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        h = (h.to(tl.float32) * inv_rms * nw).to(dt)
    h = h.to(tl.float32)[None, :]
    acc += tl.sum(w.to(tl.float32) * h, axis=1)
    if SILU_MUL:
        acc_up += tl.sum(w_up.to(tl.float32) * h, axis=1)
    return acc, acc_up


@triton.jit
def _small_linear_kernel(x_ptr, r_ptr, nw_ptr, w_ptr, y_ptr, s_ptr, N, K, EPS: tl.constexpr,
                         NORM: tl.constexpr, RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr, PDL: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    n_ok = n < N
    dt: tl.constexpr = y_ptr.dtype.element_ty
    x_row, r_row = x_ptr + row * K, r_ptr + row * K
    w_rows = w_ptr + n.to(tl.int64)[:, None] * K
    # The first weight chunk is loaded before anything an earlier kernel writes is read: weights
    # are constants, so under programmatic dependent launch (custom_ops/dependent_launch.py) this
    # load overlaps the tail of the kernel ahead.
    w_ok = n_ok[:, None] & (kk < K)[None, :]
    w = tl.load(w_rows + kk[None, :], mask=w_ok, other=0.0)
    w_up = w
    if SILU_MUL:  # the up rows: N rows further on
        w_up = tl.load(w_rows + N * K + kk[None, :], mask=w_ok, other=0.0)
    if PDL:
        ready = wait_for_earlier_kernels()
        x_row, r_row = x_row + ready, r_row + ready
    inv_rms = 0.0
    if NORM:  # the row's norm, of the rounded residual sum when there is one
        ss = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            s = tl.load(x_row + k, mask=k < K, other=0.0)
            if RESIDUAL:
                s = (s.to(tl.float32) + tl.load(r_row + k, mask=k < K, other=0.0).to(tl.float32)).to(dt)
                if tl.program_id(1) == 0:
                    tl.store(s_ptr + row * K + k, s, mask=k < K)
            s = s.to(tl.float32)
            ss += s * s
        inv_rms = tl.rsqrt(tl.sum(ss, axis=0) / K + EPS)
    acc, acc_up = _accumulate(tl.zeros([BLOCK_N], tl.float32), tl.zeros([BLOCK_N], tl.float32), w, w_up, x_row,
                              r_row, nw_ptr, kk, K, inv_rms, dt, NORM, RESIDUAL, SILU_MUL)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + kk
        w_ok = n_ok[:, None] & (k < K)[None, :]
        w = tl.load(w_rows + k[None, :], mask=w_ok, other=0.0)
        w_up = w
        if SILU_MUL:
            w_up = tl.load(w_rows + N * K + k[None, :], mask=w_ok, other=0.0)
        acc, acc_up = _accumulate(acc, acc_up, w, w_up, x_row, r_row, nw_ptr, k, K, inv_rms, dt, NORM, RESIDUAL,
                                  SILU_MUL)
    if SILU_MUL:
        g = acc.to(dt).to(tl.float32)
        out = (g * tl.sigmoid(g) * acc_up.to(dt).to(tl.float32)).to(dt)
    else:
        out = acc.to(dt)
    tl.store(y_ptr + row * N + n, out, mask=n_ok)


def launch_parameters(k: int, silu_mul: bool) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for weights of k inputs: a row of inputs at once where it fits
    (each chunk of K is one round trip to memory, and a projection of a few MB takes only a
    few of them), and as many output columns as then fill TILE_ELEMENTS (halved for silu_mul,
    whose programs hold a gate tile and an up tile)."""
    block_k = min(triton.next_power_of_2(k), 4096)
    budget = TILE_ELEMENTS // (2 if silu_mul else 1)
    return max(1, min(16, budget // block_k)), block_k


def _launch(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor | None, w: torch.Tensor,
            eps: float, silu_mul: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    (m, k), n = x.shape, w.shape[0] // (2 if silu_mul else 1)
    x, w = x.contiguous(), w.contiguous()
    y = x.new_empty(m, n)
    s = x.new_empty(m, k) if residual is not None else None
    block_n, block_k = launch_parameters(k, silu_mul)
    # rows on the fast grid axis: the programs of one weight tile run together and share it in L2
    wrap_triton(_small_linear_kernel)[(m, triton.cdiv(n, block_n))](
        x, residual.contiguous() if residual is not None else x, norm_weight if norm_weight is not None else x,
        w, y, s if s is not None else y, n, k, EPS=eps, NORM=norm_weight is not None,
        RESIDUAL=residual is not None, SILU_MUL=silu_mul, PDL=dependent_launch_enabled(x.device), BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=WARPS)
    return y, s


def small_linear_triton(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The Triton path (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    return _launch(x, None, None, w, 0.0, False)[0]


def rms_norm_linear_triton(x: torch.Tensor, norm_weight: torch.Tensor, w: torch.Tensor, eps: float,
                           silu_mul: bool) -> torch.Tensor:
    return _launch(x, None, norm_weight, w, eps, silu_mul)[0]


def add_rms_norm_linear_triton(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, w: torch.Tensor,
                               eps: float, silu_mul: bool) -> tuple[torch.Tensor, torch.Tensor]:
    y, s = _launch(x, residual, norm_weight, w, eps, silu_mul)
    return y, s


def _silu_mul_reference(y: torch.Tensor) -> torch.Tensor:
    c = torch.float64 if y.dtype == torch.float64 else torch.float32
    gate, up = y.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate.to(c)) * up.to(c)).to(y.dtype)


def small_linear_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Plain torch; float64 inputs give the float64 oracle."""
    return torch.nn.functional.linear(x, w)


def rms_norm_linear_reference(x: torch.Tensor, norm_weight: torch.Tensor, w: torch.Tensor, eps: float,
                              silu_mul: bool) -> torch.Tensor:
    from qwen3_aot.custom_ops.rms_norm import rms_norm_reference

    y = torch.nn.functional.linear(rms_norm_reference(x, norm_weight, eps), w)
    return _silu_mul_reference(y) if silu_mul else y


def add_rms_norm_linear_reference(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                                  w: torch.Tensor, eps: float, silu_mul: bool) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = (x.to(c) + residual.to(c)).to(x.dtype)
    return rms_norm_linear_reference(s, norm_weight, w, eps, silu_mul), s


@triton_op("qwen3_aot::small_linear", mutates_args=())
def small_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return small_linear_triton(x, w)


@triton_op("qwen3_aot::rms_norm_linear", mutates_args=())
def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, w: torch.Tensor, eps: float,
                    silu_mul: bool) -> torch.Tensor:
    return rms_norm_linear_triton(x, norm_weight, w, eps, silu_mul)


@triton_op("qwen3_aot::add_rms_norm_linear", mutates_args=())
def add_rms_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, w: torch.Tensor,
                        eps: float, silu_mul: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return add_rms_norm_linear_triton(x, residual, norm_weight, w, eps, silu_mul)


small_linear.register_kernel("cpu")(small_linear_reference)
rms_norm_linear.register_kernel("cpu")(rms_norm_linear_reference)
add_rms_norm_linear.register_kernel("cpu")(add_rms_norm_linear_reference)


def _out_columns(w: torch.Tensor, silu_mul: bool) -> int:
    return w.shape[0] // 2 if silu_mul else w.shape[0]


@small_linear.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


@rms_norm_linear.register_fake
def _(x, norm_weight, w, eps, silu_mul):
    return x.new_empty(x.shape[0], _out_columns(w, silu_mul))


@add_rms_norm_linear.register_fake
def _(x, residual, norm_weight, w, eps, silu_mul):
    return x.new_empty(x.shape[0], _out_columns(w, silu_mul)), torch.empty_like(x)
