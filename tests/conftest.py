"""Shared fixtures. Triton kernels run on CUDA when there is a GPU, else on CPU
under the Triton interpreter, which must be switched on before triton is imported."""

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0" if Path("/dev/nvidiactl").exists() else "1")
# pytest-xdist workers (pyproject's addopts) share the cores: each gets an equal share for
# torch's thread pool, which otherwise takes every core in every worker and oversubscribes
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

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


@pytest.fixture
def poison_new_tensors(monkeypatch):
    """Every floating tensor made by torch.empty, torch.empty_like or Tensor.new_empty during the
    test starts as NaN, so an output element that a kernel never writes shows up (fresh memory
    is often zeros, or a previous call's result)."""
    def poisoning(make):
        def make_poisoned(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return make_poisoned

    for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
        monkeypatch.setattr(owner, name, poisoning(getattr(owner, name)))


def rounded_once_tol(dtype: torch.dtype, interpreted: bool) -> float:
    """Normwise bound, against float64, on a result computed in fp32 and rounded once to `dtype`:
    the unit roundoff (eps / 2) of round-to-nearest, a whole eps where the Triton interpreter
    converts to bf16 by truncating, plus a few fp32 roundings of the arithmetic before it
    (a sum, an rsqrt, approximate on CUDA, and products)."""
    truncates = interpreted and dtype == torch.bfloat16
    return (2 if truncates else 1) * torch.finfo(dtype).eps / 2 + 8 * torch.finfo(torch.float32).eps / 2


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
