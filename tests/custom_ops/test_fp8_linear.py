"""The FP8 projection against float64, on shapes whose K and N are not multiples of 128 (partial
blocks): the reference no further from float64 than one rounding, the Triton kernels (the
interpreter on CPU) no further than the reference; which weight-only kernel runs for how many
rows, a choice a graph keeps symbolic; the activation quantizer and the weight quantizer against
the formats' definitions; on a GPU, the cuBLAS path and both paths through AOTInductor."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from suite_support import rel_err, rounded_once_tol
from qwen3_aot.custom_ops import fp8_linear as fp8
from qwen3_aot.quantization import quantize_block_fp8

SHAPES = [(1, 37, 300), (3, 130, 520)]  # (M, N, K)
GEMM_SHAPES = [(70, 40, 200)]  # more rows than one GEMM tile holds (GEMM_BLOCK_M)
# weight-only above ROWS_KERNEL_MAX rows: the tiles kernel, also past one tile of rows (TILES_BLOCK_M)
TILES_SHAPES = [(5, 37, 300), (70, 130, 520)]
DTYPES = [torch.float32, torch.bfloat16]
SRC = Path(__file__).resolve().parents[2] / "src"


def _inputs(m, n, k, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    x[0, :5] = 0.0  # a few zeros; a whole group of zeros below
    if k > 256:
        x[-1, 128:256] = 0.0
    w = (torch.randn(n, k, generator=g) * 30).clamp(-448, 448).to(fp8.FP8)
    scale = torch.rand(n, -(-k // 128), generator=g) / 300 + 1e-4
    return x.to(dtype).to(device), w.to(device), scale.to(device)


def _oracle(x, w, scale, act_quant):
    """float64 of the definition: the activation quantization (when asked for) of x's fp32 values,
    then exact dequantized products summed in float64."""
    xc = x.cpu()
    if act_quant:
        q, s = fp8.quantize_groups_reference(xc)
        xc = fp8.dequantize(q, s)
    return torch.nn.functional.linear(xc.double(), fp8.dequantize(w.cpu(), scale.cpu()))


@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_is_float64_rounded_once(shape, dtype, act_quant):
    x, w, scale = _inputs(*shape, dtype, "cpu", seed=sum(shape))
    oracle = _oracle(x, w, scale, act_quant)
    assert rel_err(fp8.fp8_linear_reference(x, w, scale, act_quant), oracle) <= rounded_once_tol(dtype, False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, act_quant", [(s, a) for s in SHAPES for a in (False, True)]
                         + [(s, True) for s in GEMM_SHAPES] + [(s, False) for s in TILES_SHAPES])
def test_triton_kernels_are_as_close_to_float64_as_the_reference(shape, dtype, act_quant, kernel_device,
                                                                  poison_new_tensors):
    x, w, scale = _inputs(*shape, dtype, kernel_device, seed=1 + sum(shape))
    got = fp8.fp8_linear_triton(x, w, scale, act_quant)
    assert got.shape == (shape[0], shape[1]) and got.dtype == dtype
    oracle = _oracle(x, w, scale, act_quant)
    ref_err = rel_err(fp8.fp8_linear_reference(x.cpu(), w.cpu(), scale.cpu(), act_quant), oracle)
    assert rel_err(got, oracle) <= 1.25 * ref_err + rounded_once_tol(dtype, interpreted=kernel_device == "cpu")


@pytest.mark.parametrize("shape", [(3, 300), (5, 128), (2, 1000)])
def test_activation_quantizer_is_the_definition(shape, kernel_device):
    """Group scale amax / 448, values x / scale rounded to the nearest e4m3 (ties to even): the
    kernel's scales and values are torch's, bit for bit (its divisions are correctly rounded)."""
    g = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[1])).to(torch.bfloat16)
    x[0, :128] = 0.0
    q, s = fp8.quantize_groups_triton(x.to(kernel_device))
    rq, rs = fp8.quantize_groups_reference(x)
    assert torch.equal(s.cpu(), rs) and rs[0, 0] == 1.0
    assert torch.equal(q.cpu().float(), rq.float())
    groups = torch.nn.functional.pad(x.float(), (0, rs.shape[1] * 128 - shape[1])).view(shape[0], -1, 128)
    assert torch.equal(rs, torch.where(groups.abs().amax(-1) > 0, groups.abs().amax(-1) / 448, 1.0))


def test_column_major_activation_scales_are_the_same_scales(kernel_device):
    """cuBLAS reads activation scales groups-outermost: the same values, only laid out so."""
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    q, s = fp8.quantize_groups_triton(x.to(kernel_device), column_major=True)
    rq, rs = fp8.quantize_groups_reference(x)
    assert s.stride() == (1, 5) and torch.equal(s.cpu(), rs) and torch.equal(q.cpu().float(), rq.float())


def test_padded_rows_quantize_as_zeros_with_scale_one(kernel_device):
    """cuBLAS's path pads the rows to a multiple of 16: the rows past x's are zeros with scale 1
    (whatever the buffer held), so they cannot reach another row's output; the rest unchanged."""
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    q, s = fp8.quantize_groups_triton(x.to(kernel_device), column_major=True, rows=16)
    rq, rs = fp8.quantize_groups_reference(x)
    assert q.shape == (16, 300) and s.shape == (16, 3) and s.stride() == (1, 16)
    assert torch.equal(s[:5].cpu(), rs) and torch.equal(q[:5].cpu().float(), rq.float())
    assert torch.all(s[5:] == 1.0) and torch.all(q[5:].float() == 0.0)


def test_weight_only_runs_the_rows_kernel_up_to_its_rows_and_the_tiles_kernel_above(monkeypatch, kernel_device):
    """Both kernels are launched (the row count is symbolic in a graph); exactly one of them
    with programs, the rows kernel up to ROWS_KERNEL_MAX rows, and its output is the result."""
    launched, wrap = [], fp8.wrap_triton

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            if grid[0] * grid[1] > 0:
                launched.append(self.kernel)
            return wrap(self.kernel)[grid]

    monkeypatch.setattr(fp8, "wrap_triton", Recording)
    for m in (1, fp8.ROWS_KERNEL_MAX, fp8.ROWS_KERNEL_MAX + 1, fp8.TILES_BLOCK_M + 1):
        launched.clear()
        x, w, scale = _inputs(m, 37, 300, torch.bfloat16, kernel_device, seed=m)
        got = fp8.fp8_weight_only_triton(x, w, scale)
        assert launched == [fp8._fp8_rows_kernel if m <= fp8.ROWS_KERNEL_MAX else fp8._fp8_tiles_kernel], m
        oracle = _oracle(x, w, scale, False)
        assert rel_err(got, oracle) <= 1.25 * rel_err(fp8.fp8_linear_reference(x.cpu(), w.cpu(), scale.cpu(), False),
                                                      oracle) + rounded_once_tol(torch.bfloat16, True)


TRACE_WEIGHT_ONLY = r"""
import json
import torch
from qwen3_aot.custom_ops import fp8_linear as fp8

class WeightOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(37, 300).to(fp8.FP8))
        self.register_buffer("s", torch.rand(37, 3))

    def forward(self, x):
        return fp8.fp8_weight_only_triton(x, self.w, self.s)

rows = torch.export.Dim("rows", min=1, max=4096)
ep = torch.export.export(WeightOnly(), (torch.randn(9, 300).bfloat16(),), dynamic_shapes=({0: rows},))
(symbol, bounds), = ep.range_constraints.items()
launches = [n for n in ep.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_mutation]
print(json.dumps({"rows": [int(bounds.lower), int(bounds.upper)],
                  "grids_of_rows": [symbol in n.kwargs["grid"][0][0].meta["val"].node.expr.free_symbols
                                    for n in launches]}))
"""


def test_the_weight_only_launches_keep_the_row_count_symbolic():
    """Exported over a dynamic row count, as the graphs trace the op's body: both launches are in
    the graph, each grid an expression of the row count, and the whole range stays (a Python
    comparison of the row count, in place of at_least, guards it and export refuses). In a
    process of its own without the interpreter, whose kernels export cannot trace."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", TRACE_WEIGHT_ONLY], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    traced = json.loads(done.stdout.strip().splitlines()[-1])
    assert traced == {"rows": [1, 4096], "grids_of_rows": [True, True]}


def _block_scaled(m, n, k, seed):
    """_inputs in bf16 with one scale per 128x128 block, repeated over the block's rows."""
    x, w, scale = _inputs(m, n, k, torch.bfloat16, "cpu", seed)
    return x, w, scale[::128].repeat_interleave(128, 0)[:n].contiguous()


CUBLAS = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                            reason="cuBLAS's block-scaled FP8 GEMM runs on sm_90")


@CUBLAS
@pytest.mark.parametrize("m", [1, 3, 64, 300])
def test_cublas_block_gemm_is_as_close_to_float64_as_the_reference(m, monkeypatch):
    monkeypatch.setenv("QWEN3_AOT_FP8_GEMM", "cublas")
    x, w, scale = _block_scaled(m, 384, 1024, seed=m)
    assert fp8.cublas_gemm_chosen(x.cuda().device, x.dtype, w.shape, True, True)
    got = fp8.fp8_gemm_cublas(x.cuda(), w.cuda(), scale.cuda())
    assert got.shape == (m, 384) and got.dtype == torch.bfloat16
    oracle = _oracle(x, w, scale, True)
    ref_err = rel_err(fp8.fp8_linear_reference(x, w, scale, True), oracle)
    assert rel_err(got, oracle) <= 1.25 * ref_err + rounded_once_tol(torch.bfloat16, interpreted=False)
    # the op takes this path only when told the scales are by block, and then agrees with the Triton GEMM's bound
    op = torch.ops.qwen3_aot.fp8_linear(x.cuda(), w.cuda(), scale.cuda(), True, True)
    assert torch.equal(op, got)


def _compiled_projection(tmp_path, x, w, scale, act_quant, block_scales):
    """The op over x's rows as one graph with a dynamic row count, through torch.export and
    AOTInductor: the loaded package."""
    class Projection(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", w)
            self.register_buffer("scale", scale)

        def forward(self, x):
            return torch.ops.qwen3_aot.fp8_linear(x, self.w, self.scale, act_quant, block_scales)

    ep = torch.export.export(Projection(), (x,), dynamic_shapes=({0: torch.export.Dim("rows", min=1, max=4096)},))
    return torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "p.pt2")))


@CUBLAS
def test_cublas_block_gemm_compiles_through_aoti_as_eager(tmp_path, monkeypatch):
    """The op with block scales through AOTInductor (torch._scaled_mm has a C shim): the package
    computes what eager computes, at two row counts of one dynamic graph."""
    monkeypatch.setenv("QWEN3_AOT_FP8_GEMM", "cublas")  # read when the op is traced
    x, w, scale = (t.cuda() for t in _block_scaled(96, 256, 512, seed=7))
    compiled = _compiled_projection(tmp_path, x, w, scale, True, True)
    for rows in (96, 3):
        xr = x[:rows].contiguous()
        assert torch.equal(compiled(xr), fp8.fp8_gemm_cublas(xr, w, scale))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 weights need a GPU of compute capability 8.9 or more")
def test_weight_only_compiles_through_aoti_as_eager(tmp_path):
    """Both weight-only kernels in one graph of a dynamic row count (each launched with no
    programs where the other runs): the package computes what eager computes on either side."""
    x, w, scale = (t.cuda() for t in _inputs(100, 256, 520, torch.bfloat16, "cpu", seed=9))
    compiled = _compiled_projection(tmp_path, x, w, scale, False, False)
    for rows in (100, 1, fp8.ROWS_KERNEL_MAX, fp8.ROWS_KERNEL_MAX + 1, 64):
        xr = x[:rows].contiguous()
        assert torch.equal(compiled(xr), fp8.fp8_weight_only_triton(xr, w, scale)), rows


def test_weight_quantizer_rounds_each_128x128_block_to_nearest():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 300, generator=g).to(torch.bfloat16)
    w[128:, 256:] = 0.0  # an all-zero block: scale 1
    q, s = quantize_block_fp8(w)
    assert q.dtype == fp8.FP8 and s.shape == (2, 3) and s[1, 2] == 1.0
    block = w[:128, 128:256].float()
    assert s[0, 1] == block.abs().max() / 448 and q[:128, 128:256].float().abs().max() == 448
    # round to nearest: the dequantized weight is within half an e4m3 step (2^-4 relative) of w
    deq = fp8.dequantize(q, s.repeat_interleave(128, 0)[:200])
    assert ((deq - w.double()).abs() <= w.double().abs() * 2 ** -4 + 2 ** -10 * s.max()).all()
