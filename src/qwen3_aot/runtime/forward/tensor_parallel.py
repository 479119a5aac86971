"""The forward of a tensor-parallel artifact (build/tensor_parallel.py): one worker process per
rank, driven from this process, which keeps the scheduler, the sampler and the KV cache's
block bookkeeping.

Every rank is a worker (torch.multiprocessing, spawn), none is this process: this process
joins no process group, so a service's own torch.distributed use does not collide with ours,
and a rank that dies or hangs cannot take it down (NCCL's watchdog aborts the process a
broken collective runs in). Each worker joins the group (gloo on CPU, NCCL on GPU, rank r
on GPU r, through a TCPStore this process hosts on 127.0.0.1 at a port the OS picks),
registers it under the name the compiled collectives call, loads the one rank graph with its
own shard as constants, and then serves steps: this process sends each step's inputs (host
arrays: a few ints per token) to every rank, the ranks run the graph together, and rank 0
writes the gathered logits into a buffer shared with this process (shared memory on CPU,
CUDA IPC on GPU) before it answers.

Every wait has a timeout and also wakes when any worker process ends, so a rank that dies
ends the step, and from then on the engine, with our error; the other workers are stopped.
The workers are daemons: they also end with this process, and on their own when its end of
the pipe closes. Each rank holds the KV cache of its KV heads; it is allocated when a step
brings a cache this process has not passed before (`__call__`), with that cache's number of
blocks, so the engine's bookkeeping-only cache (on the meta device) and a FlatBatchDriver's
fresh caches both work unchanged.

Decode steps run without CUDA graphs here (the workers call the graph directly). The workers
are spawned, so they import the caller's main module: a script that loads a tensor-parallel
artifact must guard its top level with `if __name__ == "__main__":`.

On CPU the compiled graph calls our ops as Python functions and `boxed_run` holds the GIL for
the whole forward, so no tensor Python has seen may reach a collective: a gloo thread dropping
its last reference would wait for the GIL while the graph waits for that thread (a deadlock,
seen in gdb). The rank graph's build keeps them apart (build/tensor_parallel.py).
"""

from __future__ import annotations

import datetime
import multiprocessing.connection
import os
import time
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing  # noqa: F401  (registers the reductions that share tensors through pipes)

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.forward.flat_batch import FlatBatch
from qwen3_aot.runtime.forward.kv_cache import cache_tensors, cuda_cache_bytes
from qwen3_aot.weights import DTYPES

STARTUP_TIMEOUT_S = 600.0  # start, join the group and load a shard (a 32B shard reads tens of GB)
STEP_TIMEOUT_S = 300.0     # one step, or the cache allocated (NCCL connects the ranks at the first)
STOP_TIMEOUT_S = 10.0      # a worker asked to stop before it is killed
META = torch.device("meta")  # where the engine's cache lives in this process: shapes, no memory


def tensor_parallel_size(manifest: dict) -> int | None:
    """The number of ranks of a tensor-parallel artifact, None for a one-process one."""
    entry = manifest.get("tensor_parallel")
    if entry is None:
        return None
    shards = entry.get("shards") if isinstance(entry, dict) else None
    size = entry.get("size") if isinstance(entry, dict) else None
    if not (isinstance(size, int) and size >= 1 and isinstance(shards, list) and len(shards) == size
            and all(isinstance(s, dict) and isinstance(s.get("weights"), str) for s in shards)
            and isinstance(entry.get("group_name"), str)):
        raise Qwen3AotError("the artifact's manifest has a damaged tensor_parallel entry; rebuild the artifact.")
    return size


class TensorParallelForward:
    """Calls the rank graph on every worker with the model's flat-batch inputs (see
    `qwen3_aot.model.Qwen3ForCausalLM.forward`); returns fp32 logits [N, vocab] on `device`.
    k_caches / v_caches name a cache (see the module docstring); the ranks hold its tensors.
    `close()` (or dropping it) stops the workers. Implements runtime.forward.flat_batch.Forward;
    called with the graph's positional inputs it runs as the eager model does (drivers, tests)."""

    def __init__(self, artifact: Path, manifest: dict, device: torch.device) -> None:
        self.size = tensor_parallel_size(manifest)
        self.device, self.worker_pids = device, []
        self._vocab = manifest["model_config"]["vocab_size"]
        if device.type == "cuda" and torch.cuda.device_count() < (device.index or 0) + self.size:
            raise Qwen3AotError(f"{artifact} is split over {self.size} GPUs (one per rank, from {device} on) and "
                                f"torch sees {torch.cuda.device_count()}; run it on a machine with enough GPUs or "
                                "rebuild it with a smaller --tensor-parallel.")
        started = time.perf_counter()
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
        ctx = torch.multiprocessing.get_context("spawn")
        self._procs, self._conns = [], []
        for rank in range(self.size):
            ours, theirs = ctx.Pipe()
            dev = "cpu" if device.type == "cpu" else f"cuda:{(device.index or 0) + rank}"
            p = ctx.Process(target=_serve_rank, name=f"qwen3-aot-tp-rank{rank}", daemon=True,
                            args=(rank, self.size, self._store.port, str(artifact), manifest, dev, theirs))
            p.start()
            theirs.close()
            self._procs.append(p)
            self._conns.append(ours)
        self.worker_pids = [p.pid for p in self._procs]
        self._finalizer = weakref.finalize(self, _stop, self._procs, self._conns)
        self._broken: Qwen3AotError | None = None
        self._cache: weakref.ref | None = None
        self._out: torch.Tensor | None = None  # rank 0's logits, shared with it
        self._wait_all("start-up (joining the group, loading the shards)", STARTUP_TIMEOUT_S)
        self.load_seconds = {"workers": time.perf_counter() - started}  # every rank started and loaded

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
                 block_tables: torch.Tensor, logit_rows: torch.Tensor,
                 k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        return self.run(FlatBatch(input_ids, positions, seq_ids, block_tables, logit_rows), k_caches, v_caches)

    def run(self, batch: FlatBatch, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        if self._broken is not None:
            raise self._broken
        step: dict[str, Any] = {"inputs": [t.cpu().numpy() for t in batch.inputs()]}
        if self._cache is None or self._cache() is not k_caches[0]:
            step["cache"] = tuple(k_caches[0].shape[:2])  # num_blocks, block_size: fresh zeros on every rank
            self._cache = weakref.ref(k_caches[0])
        rows = batch.logit_rows.shape[0]
        first = dict(step)
        if self._out is None or self._out.shape[0] < rows:
            self._out = _shared(torch.empty(max(rows, 2 * (0 if self._out is None else self._out.shape[0])),
                                            self._vocab, dtype=torch.float32, device=self.device))
            first["out"] = self._out
        self._send([first] + [step] * (self.size - 1), "a step")
        self._wait_all("a step", STEP_TIMEOUT_S)
        return self._out[:rows].clone()  # the next step writes the buffer again

    def cuda_cache_bytes(self, utilization: float, max_tokens: int, rows: int) -> int:
        """The KV-cache bytes each rank can hold: `utilization` of its GPU less what is in use and
        the peak of the largest step (measured by every rank running one); the least of them."""
        self._send([{"plan": (utilization, max_tokens, rows)}] * self.size, "sizing the KV cache")
        return min(self._wait_all("sizing the KV cache", STEP_TIMEOUT_S))

    def close(self) -> None:
        """Stop the workers; idempotent."""
        self._finalizer()

    # ---- talking to the workers ----

    def _send(self, messages: list[dict], what: str) -> None:
        if self._broken is not None:
            raise self._broken
        for rank, (conn, msg) in enumerate(zip(self._conns, messages)):
            try:
                conn.send(msg)
            except OSError:
                self._fail(self._ended(rank, what))

    def _wait_all(self, what: str, timeout: float) -> list[Any]:
        """Every rank's answer; our error (the workers stopped) if one fails, ends or is late."""
        if self._broken is not None:
            raise self._broken
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < self.size:
            pending = {self._conns[r]: r for r in range(self.size) if r not in answers}
            sentinels = {p.sentinel: r for r, p in enumerate(self._procs)}
            ready = multiprocessing.connection.wait([*pending, *sentinels], max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted(pending.values())
                self._fail(f"tensor-parallel rank {late[0]} gave no answer to {what} within {timeout:.0f} s (a hung "
                           "collective or device); its workers were stopped. Load the artifact again.")
            for obj in ready:
                if obj in pending:
                    rank = pending[obj]
                    try:
                        kind, payload = obj.recv()
                    except (EOFError, OSError):
                        self._fail(self._ended(rank, what))
                    if kind == "error":
                        dead = self._dead_peer(rank)
                        if dead is not None:  # its collective failed because a peer died: report the death
                            self._fail(self._ended(dead, what))
                        self._fail(f"tensor-parallel rank {rank} failed in {what}: {payload}. Its workers were "
                                   "stopped; load the artifact again.")
                    answers[rank] = payload
            for obj in ready:
                if obj in sentinels and not self._procs[sentinels[obj]].is_alive():
                    self._fail(self._ended(sentinels[obj], what))
        return [answers[r] for r in range(self.size)]

    def _dead_peer(self, rank: int) -> int | None:
        """A rank other than `rank` that has ended, if any (given a moment to be reaped)."""
        for r, p in enumerate(self._procs):
            if r != rank:
                p.join(0.2)
                if not p.is_alive():
                    return r
        return None

    def _ended(self, rank: int, what: str) -> str:
        p = self._procs[rank]
        p.join(1.0)
        code = p.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited (code {code})"
        hint = (" A script that loads a tensor-parallel artifact must guard its top level with "
                "`if __name__ == \"__main__\":` (the workers are spawned and import it).") if what.startswith(
                    "start-up") else ""
        return (f"tensor-parallel rank {rank} (pid {p.pid}) {how} during {what}; the engine cannot go on without it "
                "and its other workers were stopped. Load the artifact again; if it recurs, see the worker's output "
                "(out of memory, a signal)." + hint)

    def _fail(self, message: str) -> None:
        self._broken = Qwen3AotError(message)
        for p in self._procs:  # at once: a rank whose peer died waits in its collective
            p.kill()
        self.close()
        raise self._broken


def _shared(t: torch.Tensor) -> torch.Tensor:
    """A tensor a worker can write into: shared memory on CPU; a CUDA tensor goes by IPC as it is."""
    return t.share_memory_() if t.device.type == "cpu" else t


def _stop(procs: list, conns: list) -> None:
    for conn in conns:
        try:
            conn.send({"stop": True})
        except OSError:
            pass
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(STOP_TIMEOUT_S)
    for conn in conns:
        conn.close()


# ---- the worker process ----

def _serve_rank(rank: int, size: int, port: int, artifact: str, manifest: dict, device: str,
                conn: multiprocessing.connection.Connection) -> None:
    """A worker's life: join the group, load the rank's shard, answer messages until told to
    stop or this process's parent goes away. Every message gets ("ok", result) or ("error", why)."""
    try:
        forward, dev = _start_rank(rank, size, port, Path(artifact), manifest, device)
    except BaseException as e:  # noqa: BLE001  (the parent must hear why, whatever it is)
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", None))
    caches: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    out: torch.Tensor | None = None
    # the rank's config as its caches see it: its share of the KV heads
    cfg = {**manifest["model_config"], "num_key_value_heads": manifest["model_config"]["num_key_value_heads"] // size}
    block_size, dtype = manifest["kv_cache"]["block_size"], DTYPES[manifest["dtype"]]
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the engine's process is gone
                return
            if "stop" in msg:
                return
            try:
                with torch.inference_mode():
                    if "plan" in msg:
                        utilization, max_tokens, rows = msg["plan"]
                        conn.send(("ok", cuda_cache_bytes(forward, cfg, block_size, dtype, dev, utilization,
                                                          max_tokens, rows)))
                        continue
                    if "cache" in msg:
                        caches = ([], [])  # the old one freed first
                        caches = cache_tensors(cfg, *msg["cache"], dtype, dev)
                    out = msg.get("out", out)
                    inputs = [torch.from_numpy(a).to(dev) for a in msg["inputs"]]
                    logits = forward.run(FlatBatch(*inputs), *caches)
                    if rank == 0:
                        out[:logits.shape[0]].copy_(logits)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)  # the logits are in the buffer before the answer
                conn.send(("ok", None))
            except Exception as e:  # noqa: BLE001  (a failed collective leaves the group unusable: end)
                conn.send(("error", f"{type(e).__name__}: {e}"))
                return
    finally:
        dist.destroy_process_group()


def _start_rank(rank: int, size: int, port: int, artifact: Path, manifest: dict,
                device: str) -> tuple[Any, torch.device]:
    from qwen3_aot.runtime.forward.compiled import CompiledForward

    dev = torch.device(device)
    entry = manifest["tensor_parallel"]
    if dev.type == "cuda":
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off, as the GPU machines require
        torch.cuda.set_device(dev)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=store, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=STEP_TIMEOUT_S),
                            device_id=dev if dev.type == "cuda" else None)
    torch._C._distributed_c10d._register_process_group(entry["group_name"], dist.group.WORLD)
    shard = {**manifest, "weights": entry["shards"][rank]["weights"]}
    return CompiledForward(artifact, shard, dev, run_single_threaded=False), dev
