"""What tests share besides fixtures: paths, the device the runtime tests use, error
measures and tolerances, prompts from the trained fixture's text. A module of its own,
because every folder's conftest.py is imported under the one name `conftest`, so importing
names from it reaches whichever conftest came last."""

import fcntl
import functools
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-qwen3"
HAS_CUDA = torch.cuda.is_available()
# tests/runtime run on the artifact of one device: CPU by default (CI), CUDA when this is
# cuda (scripts/gpu_check.sh sets it), so that the same tests check real CUDA graphs
RUNTIME_DEVICE = os.environ.get("QWEN3_AOT_RUNTIME_DEVICE", "cpu")


@functools.cache
def train_text() -> str:
    """The text the tiny fixture model was trained on."""
    return (FIXTURE / "train_text.txt").read_text()


def text_prompts(cuts: list[tuple[int, int]]) -> list[str]:
    """Slices of the fixture's training text, one per (start, least characters), each cut at
    the first space at least that far on: before a space, because the BPE attaches spaces to
    the next word, so that the trained model continues each with clear margins."""
    text = train_text()
    return [text[start:text.index(" ", start + least)] for start, least in cuts]


def prompt_ids(cuts: list[tuple[int, int]]) -> list[list[int]]:
    """`text_prompts`, as the fixture's tokenizer encodes them."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    return [tok.encode(p).ids for p in text_prompts(cuts)]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """‖a − ref‖ / ‖ref‖ in float64; NaN or inf in `a` gives inf."""
    a, ref = a.double().cpu(), ref.double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - ref).norm() / ref.norm())


def poisoned(shape, dtype, device) -> torch.Tensor:
    """A tensor full of NaN: any element a kernel fails to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def rounded_once_tol(dtype: torch.dtype, interpreted: bool) -> float:
    """Normwise bound, against float64, on a result computed in fp32 and rounded once to `dtype`:
    the unit roundoff (eps / 2) of round-to-nearest, a whole eps where the Triton interpreter
    converts to bf16 by truncating, plus a few fp32 roundings of the arithmetic before it
    (a sum, an rsqrt, approximate on CUDA, and products)."""
    truncates = interpreted and dtype == torch.bfloat16
    return (2 if truncates else 1) * torch.finfo(dtype).eps / 2 + 8 * torch.finfo(torch.float32).eps / 2


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object], done: str = "manifest.json") -> Path:
    """`build(path)` run once per test session, by whichever pytest-xdist worker asks first;
    the others wait for it and share the result (the workers' temp dirs have one parent).
    `path / done` existing means built, so the build writes it last: an artifact's manifest
    (export renames a finished build into place)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / done).is_file():
            build(path)
    return path


THREADS_DEADLINE_S = 120  # for a whole concurrent run on a loaded 2-core CI machine


def run_threads(target, n: int, deadline_s: float = THREADS_DEADLINE_S) -> list:
    """`target(k)` in n threads at once; their results, or the first error; fails a hang."""
    results, errors = [None] * n, []

    def run(k):
        try:
            results[k] = target(k)
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + deadline_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a caller hung"
    if errors:
        raise errors[0]
    return results
