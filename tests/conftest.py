"""Shared fixtures. Triton kernels run on CUDA when there is a GPU, else on CPU
under the Triton interpreter, which must be switched on before triton is imported."""

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0" if Path("/dev/nvidiactl").exists() else "1")

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-qwen3"
HAS_CUDA = torch.cuda.is_available()
# tests/runtime run on the artifact of one device: CPU by default (CI), CUDA when this is
# cuda (scripts/gpu_check.sh sets it), so that the same tests check real CUDA graphs
RUNTIME_DEVICE = os.environ.get("QWEN3_AOT_RUNTIME_DEVICE", "cpu")


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """Where the Triton kernels run: cuda, or cpu through the interpreter."""
    return "cuda" if HAS_CUDA else "cpu"


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """‖a − ref‖ / ‖ref‖ in float64; NaN or inf in `a` gives inf."""
    a, ref = a.double().cpu(), ref.double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - ref).norm() / ref.norm())


def poisoned(shape, dtype, device) -> torch.Tensor:
    """A tensor full of NaN: any element a kernel fails to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """The trained fixture as a CPU fp32 pt2 artifact, built once per test run (~10 s)."""
    from qwen3_aot.build import export_artifact

    return export_artifact(FIXTURE, tmp_path_factory.mktemp("artifacts") / "tiny-fp32", device="cpu",
                           dtype="float32", log=lambda _msg: None)


@pytest.fixture(scope="session")
def runtime_artifact(request, tmp_path_factory):
    """The trained fixture as an fp32 artifact for RUNTIME_DEVICE, built once per test run."""
    if RUNTIME_DEVICE == "cpu":
        return request.getfixturevalue("tiny_artifact")
    from qwen3_aot.build import export_artifact

    return export_artifact(FIXTURE, tmp_path_factory.mktemp("artifacts") / f"tiny-fp32-{RUNTIME_DEVICE}",
                           device=RUNTIME_DEVICE, dtype="float32", log=lambda _msg: None)


@pytest.fixture(scope="session")
def tiny_onnx_artifact(tmp_path_factory):
    """The trained fixture as a CPU fp32 ONNX-only artifact, built once per test run."""
    from qwen3_aot.build import export_artifact

    return export_artifact(FIXTURE, tmp_path_factory.mktemp("artifacts") / "tiny-onnx", device="cpu",
                           dtype="float32", formats=("onnx",), log=lambda _msg: None)
