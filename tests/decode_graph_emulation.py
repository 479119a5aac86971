"""CUDA graphs of the decode step emulated on CPU, so that a CPU test can drive the engine
core's graph paths (`DecodeGraphs`, steps queued ahead of their inputs: overlap), which a CPU
core otherwise never takes. Real CUDA graphs need a GPU (scripts/gpu_check.sh)."""

from __future__ import annotations

import contextlib
import weakref

import torch


class FakeGraph:
    """A CPU stand-in for torch.cuda.CUDAGraph with its semantics: capture records the call
    on fixed buffers, replay reruns it on whatever they hold now, into the captured output.
    It keeps only weak references to the buffers, as a real graph keeps only addresses:
    replaying after one was freed fails."""

    capturing = None
    replays = 0

    def __init__(self, keep_graph: bool = False) -> None:
        self.instantiated = not keep_graph

    def instantiate(self) -> None:
        self.instantiated = True

    def pool(self):
        return None

    def replay(self):
        assert self.instantiated, "a graph kept for editing was replayed before instantiate()"
        FakeGraph.replays += 1
        bases = [ref() for ref in self.bases]
        assert all(b is not None for b in bases), "a captured input buffer was freed"
        args = [b.as_strided(*view) for b, view in zip(bases, self.views)] + list(self.caches)
        self.out.copy_(self.forward(*args))


@contextlib.contextmanager
def fake_capture(graph, pool=None):
    FakeGraph.capturing = graph
    yield
    FakeGraph.capturing = None


def emulated_decode_graphs(monkeypatch, core, max_batch: int, max_blocks_per_seq: int):
    """DecodeGraphs over `core`'s CPU forward and cache, captured and replayed through
    FakeGraph (torch.cuda's graph calls patched for the test's duration). The caller installs
    them: `core.graphs = ...`."""
    from qwen3_aot.runtime.forward.decode_graphs import DecodeGraphs

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    monkeypatch.setattr(torch.cuda, "device", lambda _d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    class RecordingForward:
        """The core's forward, recording what a capture saw (a CPU artifact has no small-batch graph)."""
        small_batch_graph, small_batch_max, dependent_kernels = None, 0, ()

        def run(self, batch, k_caches, v_caches):
            out = core.forward.run(batch, k_caches, v_caches)
            if FakeGraph.capturing is not None:
                g, inputs = FakeGraph.capturing, batch.inputs()
                # the static buffers the five inputs are views of, and where in them
                g.bases = [weakref.ref(a._base if a._base is not None else a) for a in inputs]
                g.views, g.caches = [(a.shape, a.stride(), a.storage_offset()) for a in inputs], (k_caches, v_caches)
                g.forward, g.out = core.forward, out
            return out

    return DecodeGraphs(RecordingForward(), core.cache, max_batch, max_blocks_per_seq, torch.device("cpu"))
