"""A linear layer for a few rows: decode's projections, which only stream the weights.

``skinny_linear(x, w) -> y``
    x: [M, K], w: [N, K] (a weight as nn.Linear stores it), same dtype; M <= SKINNY_ROWS
    y: [M, N], dtype of x
    y = x @ w.T, products accumulated in fp32, rounded once (as cuBLAS does).

Why: at M = 1 the H200 profile of a Qwen3-0.6B decode step (bench/e2e.py --profile) had
cuBLAS reading the weights of the MLP and output projections at about a quarter of the
memory bandwidth (gate_up: 12.6 MB in 11.4 us), 0.6 ms of a 1.3 ms step. Here each
program owns BLOCK_N rows of w and streams them once, all M rows of x (padded to 16 for
tl.dot) riding along, so the weights are read at the rate the loads can go.

`linear(x, w)` is what the model calls: this op up to SKINNY_ROWS rows, F.linear (cuBLAS)
above, chosen by torch.cond on the row count, which is symbolic in the exported graph:
both branches are compiled and the package picks one on the host at each call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

SKINNY_ROWS = 16  # rows up to which linear() takes this op (tl.dot pads M to 16 anyway)
# Launch parameters (any value is correct; measured on an H200 by bench/kernels.py --skinny)
BLOCK_N, BLOCK_K, STAGES = 16, 256, 4


@triton.jit
def _skinny_linear_kernel(x_ptr, w_ptr, y_ptr, M, N, K, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, FP32: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, M_PAD)
    kk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + n.to(tl.int64)[:, None] * K
    acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        w = tl.load(w_rows + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
        if FP32:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(m[:, None] < M) & (n[None, :] < N))


def skinny_linear_triton(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The Triton path (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    (m, k), n = x.shape, w.shape[0]
    x, w = x.contiguous(), w.contiguous()
    y = x.new_empty(m, n)
    wrap_triton(_skinny_linear_kernel)[(triton.cdiv(n, BLOCK_N),)](
        x, w, y, m, n, k, M_PAD=16, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, FP32=x.dtype == torch.float32,
        num_warps=4, num_stages=STAGES)
    return y


def skinny_linear_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Plain torch; float64 inputs give the float64 oracle."""
    return torch.nn.functional.linear(x, w)


@triton_op("qwen3_aot::skinny_linear", mutates_args=())
def skinny_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return skinny_linear_triton(x, w)


skinny_linear.register_kernel("cpu")(skinny_linear_reference)


@skinny_linear.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w.T: skinny_linear for at most SKINNY_ROWS rows, else F.linear."""
    return torch.cond(x.shape[0] <= SKINNY_ROWS, torch.ops.qwen3_aot.skinny_linear, torch.nn.functional.linear,
                      (x, w))
