"""A tensor-parallel artifact (the fixture at --tensor-parallel 2, CPU, gloo): greedy tokens
equal transformers', fp32 logits as close to float64 as tp=1's; its manifest records the
ranks and their shards, its forward runs as two worker processes, and a worker that dies
ends it with our error in bounded time; close() stops the workers.
"""

import os
import signal
import time

import pytest
import torch

from greedy_reference import GREEDY, hf_greedy, prompts
from suite_support import FIXTURE, rel_err
from qwen3_aot import manifest, runtime
from qwen3_aot.build.reference import Float64Forward
from qwen3_aot.driver import FlatBatchDriver
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.model import Qwen3ForCausalLM
from qwen3_aot.runtime import TensorParallelForward, load_forward
from qwen3_aot.runtime.forward import tensor_parallel as tp_runtime

# one worker builds the artifact once; every wait inside TensorParallelForward has a timeout,
# so a hang fails the test (pytest-timeout is not installed)
pytestmark = pytest.mark.xdist_group("tensor_parallel")


@pytest.fixture(scope="module")
def tp_artifact(tmp_path_factory):
    """Built once (about 20 s); without the build's verify, which runs steps."""
    from qwen3_aot.build import export

    return export(FIXTURE, tmp_path_factory.mktemp("artifacts") / "tiny-tp2", device="cpu",
                           dtype="float32", tensor_parallel=2, check=False, log=lambda _m: None)


@pytest.fixture(autouse=True)
def short_step_timeout(monkeypatch):
    monkeypatch.setattr(tp_runtime, "STEP_TIMEOUT_S", 60.0)  # a hung step fails its test in a minute


@pytest.fixture(autouse=True)
def one_thread_a_rank(monkeypatch):
    """The ranks are processes of their own, which take torch's default of a thread a core: two
    ranks beside the other pytest-xdist worker oversubscribed the 2-core CI machine, as
    serving.Server's processes did (the greedy test took 21 s beside a busy core, 11 s with one
    thread a rank). The spawned ranks inherit this environment."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_greedy_tokens_equal_transformers(tp_artifact):
    n = 6  # of the 16 prompts, 3 to 73 tokens: several blocks, prefills and decodes batched together
    with runtime.load(tp_artifact) as engine:
        got = [c.token_ids for c in engine.generate(prompts()[:n], GREEDY)]
    assert got == hf_greedy()[:n]


def test_fp32_logits_are_as_close_to_float64_as_one_ranks_and_close_stops_the_workers(tp_artifact, tiny_artifact):
    model = Qwen3ForCausalLM.from_pretrained(FIXTURE, dtype="float32", device="cpu")
    seqs = [list(range(3, 40)), [7] * 5 + list(range(100, 150)), [300, 301, 302]]  # several blocks each
    ref = torch.cat(FlatBatchDriver(Float64Forward(model), model.config, torch.float64, "cpu").logits(seqs))
    fwd = load_forward(tp_artifact)
    try:
        tp2 = torch.cat(FlatBatchDriver(fwd, model.config, torch.float32, "cpu").logits(seqs))
    finally:
        fwd.close()
    assert all(_gone(p, 15) for p in fwd.worker_pids)
    tp1 = torch.cat(FlatBatchDriver(load_forward(tiny_artifact), model.config, torch.float32, "cpu").logits(seqs))
    assert rel_err(tp2, tp1) < 1e-5
    assert rel_err(tp2, ref) <= 1.25 * rel_err(tp1, ref) + 1e-7  # the all-reduce reassociates sums: no worse


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


def test_the_builds_verify_takes_a_tensor_parallel_artifact(tp_artifact):
    """The check `export` runs by default loads the artifact as a service would: for a TP one,
    its workers (the forward without a small-batch graph) against float64 and eager."""
    from qwen3_aot.build.pipeline import verify

    model = Qwen3ForCausalLM.from_pretrained(FIXTURE, dtype="float32", device="cpu")
    compiled, eager = verify(tp_artifact, model, lambda _m: None)
    assert compiled <= 1.25 * eager + 1e-5
