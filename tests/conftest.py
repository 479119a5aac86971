"""Shared fixtures. Triton kernels run on CUDA when there is a GPU, else on CPU
under the Triton interpreter, which must be switched on before triton is imported."""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0" if Path("/dev/nvidiactl").exists() else "1")

# Each pytest-xdist worker compiles into an Inductor cache of its own: AOTInductor writes a
# graph's .json files into the shared cache non-atomically, under names given by the graph's
# hash, so two workers compiling the same graph at once packaged an empty one (seen in CI:
# "parse error ... attempting to parse an empty input" when the package loaded).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) /
                                                        f"torchinductor-{os.getuid()}-{os.environ['PYTEST_XDIST_WORKER']}"))

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest-xdist workers (pyproject's addopts) share the cores: each gets an equal share for
# torch's thread pool, which otherwise takes every core in every worker and oversubscribes.
# Set in the worker only: the processes tests start keep torch's default.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _WORKERS))

if os.environ["TRITON_INTERPRET"] == "1":
    from triton_interpreter import skip_nested_repatching  # noqa: E402

    skip_nested_repatching()

from qwen_checkpoint import qwen_artifact, qwen_checkpoint, qwen_tokenizer_json  # noqa: E402,F401  (fixtures)
from suite_support import FIXTURE, HAS_CUDA, RUNTIME_DEVICE, built_once  # noqa: E402


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Keep --dist loadgroup's groups. A worker tells the controller an item's xdist_group by a
    "@group" suffix on its nodeid, which pytest-xdist (3.8) writes to item._nodeid; pytest 9.2
    reads the nodeid from item._id instead, so the suffix was lost and each group's tests were
    spread over the workers, every worker building the group's module fixtures again
    (pytest-dev/pytest-xdist#1386). Here the suffixed id goes where pytest reads it."""
    if not config.getoption("loadgroup", default=False):  # set in xdist workers under --dist loadgroup
        return
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # a pytest without it: groups may spread (slower), the tests are the same
        return
    for item in items:
        suffixed = vars(item).get("_nodeid")
        if suffixed and suffixed != item.nodeid and hasattr(item, "_id"):
            item._id = NodeId.parse(suffixed)


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """Where the Triton kernels run: cuda, or cpu through the interpreter."""
    return "cuda" if HAS_CUDA else "cpu"


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


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """The trained fixture as a CPU fp32 pt2 artifact, built once per test run for every
    worker (~10 s alone, ~30 s beside the other worker's tests on 2 cores)."""
    from qwen3_aot.build import export

    return built_once(tmp_path_factory, "tiny-fp32", lambda path: export(
        FIXTURE, path, device="cpu", dtype="float32", log=lambda _msg: None))


@pytest.fixture(scope="session")
def runtime_artifact(request, tmp_path_factory):
    """The trained fixture as an fp32 artifact for RUNTIME_DEVICE, built once per test run."""
    if RUNTIME_DEVICE == "cpu":
        return request.getfixturevalue("tiny_artifact")
    from qwen3_aot.build import export

    return export(FIXTURE, tmp_path_factory.mktemp("artifacts") / f"tiny-fp32-{RUNTIME_DEVICE}",
                           device=RUNTIME_DEVICE, dtype="float32", log=lambda _msg: None)


@pytest.fixture(scope="session")
def tiny_onnx_artifact(tmp_path_factory):
    """The trained fixture as a CPU fp32 ONNX-only artifact, built once per test run for every
    worker (tests/build/test_onnx.py and tests/runtime/onnx run on different ones)."""
    from qwen3_aot.build import export

    return built_once(tmp_path_factory, "tiny-onnx", lambda path: export(
        FIXTURE, path, device="cpu", dtype="float32", formats=("onnx",), log=lambda _msg: None))
