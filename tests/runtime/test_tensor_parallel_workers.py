"""A tensor-parallel artifact (the fixture at --tensor-parallel 2, CPU, gloo): its manifest
records the ranks and their shards, its forward runs as two worker processes, and a worker
that dies ends it with our error in bounded time; close() stops the workers.

Greedy and logits parity with tp=1 are not tested here yet: on CPU a step can deadlock (the
compiled graph holds the GIL while a gloo thread waits for it; docs/ARCHITECTURE.md).
"""

import os
import signal
import time

import pytest
import torch

from support import FIXTURE
from qwen3_aot import manifest
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime import TensorParallelForward, load_forward

# one worker builds the artifact once; every wait inside TensorParallelForward has a timeout,
# so a hang fails the test (pytest-timeout is not installed)
pytestmark = pytest.mark.xdist_group("tensor_parallel")


@pytest.fixture(scope="module")
def tp_artifact(tmp_path_factory):
    """Built once (about 20 s); without the build's verify, which runs steps."""
    from qwen3_aot.build import export_artifact

    return export_artifact(FIXTURE, tmp_path_factory.mktemp("artifacts") / "tiny-tp2", device="cpu",
                           dtype="float32", tensor_parallel=2, check=False, log=lambda _m: None)


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_the_manifest_records_the_ranks_and_their_shards(tp_artifact):
    man = manifest.read(tp_artifact)
    tp = man["tensor_parallel"]
    assert tp["size"] == 2 and [s["weights"] for s in tp["shards"]] == ["weights.rank0.safetensors",
                                                                       "weights.rank1.safetensors"]
    assert [s["kv_heads"] for s in tp["shards"]] == [[0, 1], [1, 2]]
    assert [s["vocab"] for s in tp["shards"]] == [[0, 256], [256, 512]]
    cache = next(i for i in man["graphs"]["forward"]["inputs"] if i["name"] == "k_caches")
    assert cache["shape"][2] == 1  # a rank's KV heads


def test_a_killed_worker_ends_the_forward_with_our_error(tp_artifact):
    fwd = load_forward(tp_artifact)
    assert isinstance(fwd, TensorParallelForward) and len(fwd.worker_pids) == 2
    os.kill(fwd.worker_pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    z = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(Qwen3AotError, match=r"rank 1 \(pid \d+\) was killed by signal 9.*Load the artifact again"):
        fwd(z, z, z.int(), torch.zeros(1, 1, dtype=torch.int32), torch.tensor([1]),
            [torch.zeros(2, 16, 2, 32, device="meta")], [torch.zeros(2, 16, 2, 32, device="meta")])
    assert time.monotonic() - t0 < 30
    assert _gone(fwd.worker_pids[0], 15), "the surviving rank was not stopped"
    with pytest.raises(Qwen3AotError, match="rank 1"):  # and it stays ended
        fwd(z, z, z.int(), torch.zeros(1, 1, dtype=torch.int32), torch.tensor([1]), [], [])


def test_close_stops_the_workers(tp_artifact):
    fwd = load_forward(tp_artifact)
    pids = fwd.worker_pids
    fwd.close()
    assert all(_gone(p, 15) for p in pids)
