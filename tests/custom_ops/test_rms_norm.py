import pytest
import torch

from suite_support import rel_err, rounded_once_tol
from qwen3_aot.custom_ops.rms_norm import (add_rms_norm_reference, add_rms_norm_triton, rms_norm_reference,
                                          rms_norm_triton)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1024), (3, 1024), (7, 100), (2, 5, 96)]  # Qwen3-0.6B hidden, odd sizes, 3-D


def _inputs(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    r = torch.randn(shape, generator=g)
    w = torch.randn(shape[-1], generator=g) * 2
    w[0] = 96.5  # Qwen3's extreme norm weights must not overflow anything
    return x.to(dtype).to(device), r.to(dtype).to(device), w.to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_rms_norm_matches_float64(impl, shape, dtype, kernel_device):
    device = kernel_device if impl == "triton" else "cpu"
    x, _, w = _inputs(shape, dtype, device, seed=hash((shape, str(dtype))) % 1000)
    fn = rms_norm_triton if impl == "triton" else rms_norm_reference
    y = fn(x, w, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    oracle = rms_norm_reference(x.double().cpu(), w.double().cpu(), 1e-6)
    assert rel_err(y, oracle) <= rounded_once_tol(dtype, interpreted=device == "cpu" and impl == "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_add_rms_norm_matches_float64(impl, shape, dtype, kernel_device):
    device = kernel_device if impl == "triton" else "cpu"
    x, r, w = _inputs(shape, dtype, device, seed=1 + hash((shape, str(dtype))) % 1000)
    fn = add_rms_norm_triton if impl == "triton" else add_rms_norm_reference
    y, s = fn(x, r, w, 1e-6)
    tol = rounded_once_tol(dtype, interpreted=device == "cpu" and impl == "triton")
    # the summed stream is what the next layer reads: one rounding of the exact sum
    exact_sum = x.double().cpu() + r.double().cpu()
    assert rel_err(s, exact_sum) <= tol
    # y is the norm of the rounded sum that was returned
    assert rel_err(y, rms_norm_reference(s.double().cpu(), w.double().cpu(), 1e-6)) <= tol


def test_rms_norm_writes_every_element(kernel_device, poison_new_tensors):
    """Rows of a width that is not a power of two: masked tails must still be written (the
    outputs start as NaN)."""
    x, r, w = _inputs((5, 300), torch.float32, kernel_device, seed=7)
    y, s = add_rms_norm_triton(x, r, w, 1e-6)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert torch.isfinite(rms_norm_triton(x, w, 1e-6)).all()


@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
def test_registered_op_dispatches(op):
    """torch.ops.qwen3_aot.* runs the reference on CPU and matches it exactly."""
    x, r, w = _inputs((4, 64), torch.bfloat16, "cpu", seed=3)
    if op == "rms_norm":
        assert torch.equal(torch.ops.qwen3_aot.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    else:
        got, want = torch.ops.qwen3_aot.add_rms_norm(x, r, w, 1e-6), add_rms_norm_reference(x, r, w, 1e-6)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
