"""The wait of programmatic dependent launch must not hide from torch what a kernel writes.

torch.export learns which arguments a Triton kernel writes by analysing its compiled IR. Where
the analysis fails it assumes every argument is written, and the exported graph then returns
the weights among its outputs (seen on the GPU machine's torch 2.11 with Triton's gdc_wait).
The wait only exists in the kernel compiled for sm_90 on, so the analysis runs here, in a fresh
process without the interpreter, against a pretended sm_90 target: nothing needs a GPU. (With
Triton's gdc_wait the first test fails on torch 2.11 and passes on 2.13, whose analysis knows it.)
The same process compiles the kernels to PTX, to check where the wait sits, and every form of
the FP8 tiles kernel for sm_89 and sm_90 (CI's interpreter runs them but compiles none)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

ANALYSE = r'''
import json, sys
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

class Hopper:
    """The active driver, answering that the current GPU is an sm_90."""
    def __init__(self, real): self.real = real
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def __getattr__(self, name): return getattr(self.real, name)

try:
    real = driver.active
except RuntimeError:  # no GPU driver at all: the analysis needs nothing else of it
    real = None
driver.set_active(Hopper(real))

import torch._higher_order_ops.triton_kernel_wrap as wrap
import triton
from triton.compiler import ASTSource
from qwen3_aot.custom_ops.fp8_linear import _fp8_rows_kernel, _fp8_tiles_kernel
from qwen3_aot.custom_ops.small_linear import _small_linear_kernel

def written(kernel, kwargs):
    if hasattr(wrap, "identify_accessed_tensors"):  # torch 2.13
        return sorted(d.name for d in wrap.identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes)
    return sorted(wrap.identify_mutated_tensors(kernel, kwargs, {}))  # torch 2.11

def where_the_wait_sits(kernel, signature, constants):
    """In the kernel compiled for sm_90: its waits, and the global loads and stores before the first."""
    ptx = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    lines = ptx.splitlines()
    waits = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
    return {"waits": len(waits), "launch_dependents": ptx.count("griddepcontrol.launch_dependents"),
            "loads_before": sum("ld.global" in line for line in lines[:waits[0]]) if waits else 0,
            "stores_before": sum("st.global" in line for line in lines[:waits[0]]) if waits else 0}

out = {"small_linear": {}, "fp8": {}, "ptx": {}}
fp8 = torch.float8_e4m3fn
for pdl in (False, True):
    for norm, residual, silu_mul in ((False, False, False), (True, False, False), (True, True, False), (True, True, True)):
        x, w, y, s = torch.empty(2, 64), torch.empty(128, 64), torch.empty(2, 64), torch.empty(2, 64)
        kwargs = dict(x_ptr=x, r_ptr=x, nw_ptr=x, w_ptr=w, y_ptr=y, s_ptr=s, N=64, K=64, EPS=1e-6, NORM=norm,
                      RESIDUAL=residual, SILU_MUL=silu_mul, PDL=pdl, BLOCK_N=16, BLOCK_K=64)
        out["small_linear"][f"pdl={pdl} residual={residual} silu_mul={silu_mul} norm={norm}"] = \
            written(_small_linear_kernel, kwargs)
    x, w, ws, y = torch.empty(2, 256, dtype=torch.bfloat16), torch.empty(64, 256, dtype=fp8), torch.empty(64, 2), \
        torch.empty(2, 64, dtype=torch.bfloat16)
    out["fp8"][f"rows pdl={pdl}"] = written(_fp8_rows_kernel, dict(
        x_ptr=x, w_ptr=w, s_ptr=ws, y_ptr=y, N=64, K=256, KB=2, BLOCK_N=16, GROUPS=2, PDL=pdl))
    for act_quant in (False, True):
        a, scales = (torch.empty(2, 256, dtype=fp8), torch.empty(2, 2)) if act_quant else (x, x)
        out["fp8"][f"tiles act_quant={act_quant} pdl={pdl}"] = written(_fp8_tiles_kernel, dict(
            a_ptr=a, as_ptr=scales, w_ptr=w, ws_ptr=ws, y_ptr=y, M=2, N=64, K=256, KB=2, BLOCK_M=64, BLOCK_N=32,
            ACT_QUANT=act_quant, PRECISE=False, PDL=pdl))

constexprs = lambda *names: {c: "constexpr" for c in names}  # noqa: E731
signature = {name: "*bf16" for name in ("x_ptr", "r_ptr", "nw_ptr", "w_ptr", "y_ptr", "s_ptr")}
signature.update(N="i32", K="i32", **constexprs("EPS", "NORM", "RESIDUAL", "SILU_MUL", "PDL", "BLOCK_N", "BLOCK_K"))
out["ptx"]["small_linear"] = where_the_wait_sits(_small_linear_kernel, signature, dict(
    EPS=1e-6, NORM=True, RESIDUAL=True, SILU_MUL=False, PDL=True, BLOCK_N=4, BLOCK_K=1024))
signature = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "y_ptr": "*bf16", "N": "i32", "K": "i32",
             "KB": "i32", **constexprs("BLOCK_N", "GROUPS", "PDL")}
out["ptx"]["fp8_rows"] = where_the_wait_sits(_fp8_rows_kernel, signature, dict(BLOCK_N=4, GROUPS=16, PDL=True))
signature = {"a_ptr": "*bf16", "as_ptr": "*bf16", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "y_ptr": "*bf16",
             "M": "i32", "N": "i32", "K": "i32", "KB": "i32",
             **constexprs("BLOCK_M", "BLOCK_N", "ACT_QUANT", "PRECISE", "PDL")}
out["ptx"]["fp8_tiles"] = where_the_wait_sits(_fp8_tiles_kernel, signature, dict(
    BLOCK_M=64, BLOCK_N=32, ACT_QUANT=False, PRECISE=False, PDL=True))
# every FP8 kernel form the op launches, compiled for Ada and Hopper: the interpreter runs them
# in CI but compiles none (the tiles kernel's dots above all: FP8, bf16, fp16, fp32)
out["compiled"] = {}
for arch in (89, 90):
    for act_quant, precise in ((False, False), (False, True), (True, False), (True, True)):
        a = "*fp8e4nv" if act_quant else "*fp32" if precise else "*bf16"
        sig = {**signature, "a_ptr": a, "as_ptr": "*fp32" if act_quant else a, "y_ptr": a if not act_quant else "*bf16"}
        form = f"sm_{arch} tiles act_quant={act_quant} precise={precise}"
        try:
            triton.compile(ASTSource(_fp8_tiles_kernel, sig, dict(BLOCK_M=64, BLOCK_N=32, ACT_QUANT=act_quant,
                                                                   PRECISE=precise, PDL=arch >= 90)),
                           target=GPUTarget("cuda", arch, 32))
            out["compiled"][form] = "ok"
        except Exception as e:  # noqa: BLE001  (reported by the test)
            out["compiled"][form] = f"{type(e).__name__}: {e}"[:500]
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def analysis() -> dict[str, list[str]]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", ANALYSE], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_small_linear_writes_only_its_outputs_with_and_without_the_wait(analysis):
    modes = analysis["small_linear"]
    assert len(modes) == 8
    for mode, written in modes.items():
        expected = ["s_ptr", "y_ptr"] if "residual=True" in mode else ["y_ptr"]
        assert written == expected, mode


def test_fp8_kernels_write_only_their_output_with_and_without_the_wait(analysis):
    assert len(analysis["fp8"]) == 6
    for mode, written in analysis["fp8"].items():
        assert written == ["y_ptr"], mode


@pytest.mark.parametrize("kernel", ["small_linear", "fp8_rows"])
def test_the_wait_comes_after_the_first_weight_loads_and_before_any_store(analysis, kernel):
    ptx = analysis["ptx"][kernel]
    assert ptx["waits"] == 1 and ptx["launch_dependents"] == 1
    assert ptx["loads_before"] > 0 and ptx["stores_before"] == 0


def test_every_form_of_the_tiles_kernel_compiles_for_ada_and_hopper(analysis):
    assert len(analysis["compiled"]) == 8
    assert all(v == "ok" for v in analysis["compiled"].values()), analysis["compiled"]


def test_the_tiles_kernel_waits_before_it_reads_or_writes(analysis):
    """Its loop is pipelined by Triton, so it waits first: its launch still overlaps the kernel ahead."""
    ptx = analysis["ptx"]["fp8_tiles"]
    assert ptx["waits"] == 1 and ptx["launch_dependents"] == 1 and ptx["stores_before"] == 0
