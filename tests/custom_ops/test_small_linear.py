"""The small-batch projections against float64: no further from it than the plain-torch
reference at the same dtype (whose roundings are the op's contract), every output written."""

import pytest
import torch

from suite_support import rel_err, rounded_once_tol
from qwen3_aot.custom_ops import small_linear as small

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 37, 300), (3, 64, 1024), (2, 10, 4500)]  # (M, N, K): one row, 0.6B's hidden, K in two chunks


def _inputs(m, n, k, dtype, device, seed, silu_mul=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    r = torch.randn(m, k, generator=g)
    nw = torch.randn(k, generator=g).abs() * 2
    nw[0] = 96.5  # Qwen3's extreme norm weights
    w = torch.randn(2 * n if silu_mul else n, k, generator=g) / k ** 0.5
    return [t.to(dtype).to(device) for t in (x, r, nw, w)]


def _within_reference(got: torch.Tensor, ref: torch.Tensor, oracle: torch.Tensor, dtype, device,
                      roundings: int = 1) -> None:
    """`got` (ours) is at most 1.25x the reference's own distance from float64, plus a rounding
    for each rounding on the way: the interpreter truncates to bf16, so its roundings do not
    cancel but add up (each pulls toward zero: a 1.7% bias after the silu path's three)."""
    ref_err = rel_err(ref, oracle)
    assert rel_err(got, oracle) <= 1.25 * ref_err + roundings * rounded_once_tol(dtype, interpreted=device == "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_small_linear_matches_float64(shape, dtype, kernel_device, poison_new_tensors):
    m, n, k = shape
    x, _, _, w = _inputs(m, n, k, dtype, kernel_device, seed=m * n + k)
    y = small.small_linear_triton(x, w)
    assert y.shape == (m, n) and y.dtype == dtype
    xc, wc = x.cpu(), w.cpu()
    _within_reference(y, small.small_linear_reference(xc, wc), small.small_linear_reference(xc.double(), wc.double()),
                      dtype, kernel_device)


@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm_linear_matches_float64(shape, dtype, silu_mul, kernel_device, poison_new_tensors):
    m, n, k = shape
    x, r, nw, w = _inputs(m, n, k, dtype, kernel_device, seed=1 + m * n + k, silu_mul=silu_mul)
    y, s = small.add_rms_norm_linear_triton(x, r, nw, w, 1e-6, silu_mul)
    assert y.shape == (m, n) and s.shape == (m, k)
    # the residual stream: one rounding of the exact sum, as add_rms_norm gives it
    assert rel_err(s, x.double().cpu() + r.double().cpu()) <= rounded_once_tol(dtype, kernel_device == "cpu")
    xc, rc, nwc, wc = (t.cpu() for t in (x, r, nw, w))
    ref, _ = small.add_rms_norm_linear_reference(xc, rc, nwc, wc, 1e-6, silu_mul)
    oracle, _ = small.add_rms_norm_linear_reference(xc.double(), rc.double(), nwc.double(), wc.double(), 1e-6,
                                                    silu_mul)
    _within_reference(y, ref, oracle, dtype, kernel_device, roundings=3 if silu_mul else 2)  # h, (g and u), y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_linear_matches_float64(dtype, kernel_device, poison_new_tensors):
    x, _, nw, w = _inputs(5, 48, 200, dtype, kernel_device, seed=3, silu_mul=True)
    y = small.rms_norm_linear_triton(x, nw, w, 1e-6, True)
    xc, nwc, wc = x.cpu(), nw.cpu(), w.cpu()
    _within_reference(y, small.rms_norm_linear_reference(xc, nwc, wc, 1e-6, True),
                      small.rms_norm_linear_reference(xc.double(), nwc.double(), wc.double(), 1e-6, True),
                      dtype, kernel_device, roundings=3)


def test_a_worse_kernel_is_caught(kernel_device):
    """The bound is tight enough to fail a kernel that drops one of 300 input columns."""
    x, _, _, w = _inputs(2, 37, 300, torch.bfloat16, kernel_device, seed=5)
    x_short = x.clone()
    x_short[:, 7] = 0
    xc, wc = x.cpu(), w.cpu()
    with pytest.raises(AssertionError):
        _within_reference(small.small_linear_triton(x_short, w), small.small_linear_reference(xc, wc),
                          small.small_linear_reference(xc.double(), wc.double()), torch.bfloat16, kernel_device)


@pytest.mark.parametrize("name", ["small_linear", "rms_norm_linear", "add_rms_norm_linear"])
def test_registered_op_on_cpu_is_reference(name):
    x, r, nw, w = _inputs(3, 16, 64, torch.bfloat16, "cpu", seed=8, silu_mul=True)
    args = {"small_linear": (x, w), "rms_norm_linear": (x, nw, w, 1e-6, True),
            "add_rms_norm_linear": (x, r, nw, w, 1e-6, True)}[name]
    got = getattr(torch.ops.qwen3_aot, name)(*args)
    want = getattr(small, f"{name}_reference")(*args)
    got, want = (got, want) if name != "add_rms_norm_linear" else (torch.cat(got, 1), torch.cat(want, 1))
    assert torch.equal(got, want)
