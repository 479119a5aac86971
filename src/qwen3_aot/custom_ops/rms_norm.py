"""RMSNorm, alone and with the residual add fused in.

``rms_norm(x, weight, eps) -> y``
    x: [..., H] bf16/fp16/fp32, weight: [H] (any float dtype), y: like x.
    y = x * rsqrt(mean(x**2, -1) + eps) * weight, reduced and scaled in fp32,
    rounded once to x.dtype. (`transformers` rounds x * rsqrt(...) to x.dtype
    before the weight multiply; we keep fp32 through, as vLLM does.)

``add_rms_norm(x, residual, weight, eps) -> (y, s)``
    s = x + residual, rounded to x.dtype (exactly what an eager add gives: this
    is the residual stream the next layer reads), then y = rms_norm(s).

One Triton program per row; the row is held in registers (H <= 16384).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, s_ptr, n_cols, EPS: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * n_cols
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row + cols, s, mask=mask)
        x = s.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + EPS)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row + cols, (x * inv_rms * w).to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_cols = x.shape[-1]
    x = x.contiguous()
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else None
    rows = x.numel() // n_cols
    block = triton.next_power_of_2(n_cols)
    wrap_triton(_rms_norm_kernel)[(rows,)](
        x, residual.contiguous() if residual is not None else x, weight, y, s if s is not None else y,
        n_cols, EPS=eps, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 16),
    )
    return y, s


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Triton path (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, s = _launch(x, residual, weight, eps)
    return y, s


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain torch, same rounding as the kernel; float64 inputs give the float64 oracle."""
    c = _compute_dtype(x.dtype)
    xf = x.to(c)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(c)
    return y.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = (x.to(_compute_dtype(x.dtype)) + residual.to(_compute_dtype(x.dtype))).to(x.dtype)
    return rms_norm_reference(s, weight, eps), s


@triton_op("qwen3_aot::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_triton(x, weight, eps)


@triton_op("qwen3_aot::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return add_rms_norm_triton(x, residual, weight, eps)


rms_norm.register_kernel("cpu")(rms_norm_reference)
add_rms_norm.register_kernel("cpu")(add_rms_norm_reference)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)
