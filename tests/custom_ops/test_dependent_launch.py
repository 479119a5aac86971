"""The wait of programmatic dependent launch must not hide from torch what a kernel writes.

torch.export learns which arguments a Triton kernel writes by analysing its compiled IR. Where
the analysis fails it assumes every argument is written, and the exported graph then returns
the weights among its outputs (seen on the GPU machine's torch 2.11 with Triton's gdc_wait).
The wait only exists in the kernel compiled for sm_90 on, so the analysis runs here, in a fresh
process without the interpreter, against a pretended sm_90 target: nothing needs a GPU. (With
Triton's gdc_wait the first test fails on torch 2.11 and passes on 2.13, whose analysis knows it.)
The same process compiles the kernel to PTX, to check where the wait sits."""

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
from qwen3_aot.custom_ops.small_linear import _small_linear_kernel

def written(kwargs):
    if hasattr(wrap, "identify_accessed_tensors"):  # torch 2.13
        return sorted(d.name for d in wrap.identify_accessed_tensors(_small_linear_kernel, kwargs, {}).read_writes.writes)
    return sorted(wrap.identify_mutated_tensors(_small_linear_kernel, kwargs, {}))  # torch 2.11

out = {}
for pdl in (False, True):
    for norm, residual, silu_mul in ((False, False, False), (True, False, False), (True, True, False), (True, True, True)):
        x, w, y, s = torch.empty(2, 64), torch.empty(128, 64), torch.empty(2, 64), torch.empty(2, 64)
        kwargs = dict(x_ptr=x, r_ptr=x, nw_ptr=x, w_ptr=w, y_ptr=y, s_ptr=s, N=64, K=64, EPS=1e-6, NORM=norm,
                      RESIDUAL=residual, SILU_MUL=silu_mul, PDL=pdl, BLOCK_N=16, BLOCK_K=64)
        out[f"pdl={pdl} residual={residual} silu_mul={silu_mul} norm={norm}"] = written(kwargs)

# where the wait sits in the kernel compiled for sm_90 (bf16, norm and residual)
from triton.compiler import ASTSource
signature = {name: "*bf16" for name in ("x_ptr", "r_ptr", "nw_ptr", "w_ptr", "y_ptr", "s_ptr")}
signature.update(N="i32", K="i32", **{c: "constexpr" for c in ("EPS", "NORM", "RESIDUAL", "SILU_MUL", "PDL", "BLOCK_N", "BLOCK_K")})
constants = dict(EPS=1e-6, NORM=True, RESIDUAL=True, SILU_MUL=False, PDL=True, BLOCK_N=4, BLOCK_K=1024)
import triton
ptx = triton.compile(ASTSource(_small_linear_kernel, signature, constants), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
lines = ptx.splitlines()
waits = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
out["ptx"] = {"waits": len(waits), "launch_dependents": ptx.count("griddepcontrol.launch_dependents"),
              "loads_before": sum("ld.global" in line for line in lines[:waits[0]]) if waits else 0,
              "stores_before": sum("st.global" in line for line in lines[:waits[0]]) if waits else 0}
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def analysis() -> dict[str, list[str]]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", ANALYSE], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_small_linear_writes_only_its_outputs_with_and_without_the_wait(analysis):
    modes = {mode: written for mode, written in analysis.items() if mode != "ptx"}
    assert len(modes) == 8
    for mode, written in modes.items():
        expected = ["s_ptr", "y_ptr"] if "residual=True" in mode else ["y_ptr"]
        assert written == expected, mode


def test_the_wait_comes_after_the_first_weight_loads_and_before_any_store(analysis):
    ptx = analysis["ptx"]
    assert ptx["waits"] == 1 and ptx["launch_dependents"] == 1
    assert ptx["loads_before"] > 0 and ptx["stores_before"] == 0
