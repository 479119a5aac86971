import pytest
import torch

from conftest import rel_err
from qwen3_aot.custom_ops import skinny_linear as module
from qwen3_aot.custom_ops.skinny_linear import SKINNY_ROWS, linear, skinny_linear_reference, skinny_linear_triton

# Normwise bounds against float64: fp32 accumulation, one rounding to the output dtype.
TOL = {torch.float32: 1e-6, torch.float16: 1e-3}  # bf16 tl.dot is wrong under the interpreter: GPU only
KERNEL_DTYPES = list(TOL) + ([torch.bfloat16] if torch.cuda.is_available() else [])
TOL[torch.bfloat16] = 8e-3
# (M, N, K): Qwen3-0.6B's decode shapes, a padded M, N and K that are not multiples of the blocks
SHAPES = [(1, 6144, 1024), (16, 1024, 3072), (3, 40, 100), (7, 1000, 300)]


def _inputs(m, n, k, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    w = torch.randn(n, k, generator=g) / k ** 0.5
    return x.to(dtype).to(device), w.to(dtype).to(device)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_skinny_linear_matches_float64(shape, dtype, kernel_device, monkeypatch):
    if shape[1] > 2000 and kernel_device == "cpu":
        monkeypatch.setattr(module, "BLOCK_N", 512)  # fewer interpreted programs; the same code
    x, w = _inputs(*shape, dtype, kernel_device, seed=sum(shape))
    y = skinny_linear_triton(x, w)
    assert y.dtype == dtype and y.shape == (shape[0], shape[1])
    assert rel_err(y, skinny_linear_reference(x.double().cpu(), w.double().cpu())) <= TOL[dtype]


@pytest.mark.parametrize("rows", [1, SKINNY_ROWS, SKINNY_ROWS + 1])
def test_linear_takes_the_op_up_to_skinny_rows_and_cublas_above(rows, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.ops.qwen3_aot, "skinny_linear", lambda x, w: calls.append(x.shape[0]) or x @ w.T)
    x, w = _inputs(rows, 8, 4, torch.float32, "cpu", seed=rows)
    torch.testing.assert_close(linear(x, w), x @ w.T)
    assert calls == ([rows] if rows <= SKINNY_ROWS else [])


def test_exported_linear_keeps_both_branches():
    """The row count is symbolic in the exported graph: a cond on it, not a specialisation."""
    class Proj(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 4), requires_grad=False)

        def forward(self, x):
            return linear(x, self.w)

    t = torch.export.Dim("t", min=1, max=64)
    ep = torch.export.export(Proj(), (torch.randn(3, 4),), dynamic_shapes={"x": {0: t}})
    assert any(n.target is torch.ops.higher_order.cond for n in ep.graph.nodes)
    exported, w = ep.module(), ep.state_dict["w"]
    for rows in (1, SKINNY_ROWS, SKINNY_ROWS + 1, 64):
        x = torch.randn(rows, 4)
        torch.testing.assert_close(exported(x), x @ w.T)
