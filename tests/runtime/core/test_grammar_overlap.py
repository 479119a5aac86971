"""The overlap rule of structured outputs (vLLM's order): a decode step holding a constrained
row is queued ahead of the tokens of the step before like any other (CUDA graphs, overlap on),
and only its sampling waits until those tokens are taken, so that each mask comes from a
matcher that has seen every token before it. Checked on CPU with the decode graphs emulated
(tests/decode_graph_emulation.py), and with real graphs on a GPU: outputs hold their
constraints and equal those of the same requests with overlap off, token for token.

Validated with Python's `re` and the `jsonschema` library, never with our own code."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from decode_graph_emulation import emulated_decode_graphs
from greedy_reference import prompts
from qwen3_aot import runtime
from qwen3_aot.runtime import SamplingParams
from qwen3_aot.runtime.core.structured_output import StructuredOutput
from suite_support import RUNTIME_DEVICE

pytest.importorskip("xgrammar")
PATTERN = r"[0-9]{4,40}x"
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "k": {"enum": ["cat", "dog", "bird"]}},
          "required": ["n", "k"]}
REGEX, JSON = StructuredOutput(regex=PATTERN), StructuredOutput(json=SCHEMA)


def mixed_params() -> list[SamplingParams]:
    """Constrained rows (greedy, seeded, with penalties and logprobs, one ending by length)
    beside free rows that outlive them, so that the batch goes from all constrained to mixed to
    free only. Every row greedy or seeded: overlap on and off must give the same tokens."""
    return [SamplingParams(max_tokens=48, temperature=0, structured=REGEX),
            SamplingParams(max_tokens=48, temperature=1.0, seed=1, structured=REGEX),
            SamplingParams(max_tokens=48, temperature=0.8, seed=2, presence_penalty=0.5, structured=REGEX),
            SamplingParams(max_tokens=7, temperature=0, structured=REGEX),  # ends by length, a prefix
            SamplingParams(max_tokens=64, temperature=0, structured=JSON),
            SamplingParams(max_tokens=64, temperature=0.8, seed=3, logprobs=2, structured=JSON),
            SamplingParams(max_tokens=64, temperature=0, repetition_penalty=1.3, structured=JSON),
            SamplingParams(max_tokens=60, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=60, temperature=1.0, seed=4, ignore_eos=True, logprobs=1),
            SamplingParams(max_tokens=20, temperature=0)]


def run(core: runtime.EngineCore) -> tuple[list, int]:
    """The mixed batch's completions, and how many steps were queued ahead while a
    constrained request was still running."""
    requests = [core.add_request(p, s) for p, s in zip(prompts(10), mixed_params())]
    constrained = [r for r in requests if r.grammar is not None]
    ahead = []

    def watch(record: runtime.StepRecord) -> None:
        ahead.append(record.ahead and any(not r.finished for r in constrained))

    core.observers.append(watch)
    try:
        while core.has_unfinished():
            core.step()
    finally:
        core.observers.remove(watch)
    return [r.completion() for r in requests], sum(ahead)


def check(core: runtime.EngineCore) -> None:
    core.overlap = True
    out, constrained_ahead = run(core)
    core.overlap = False
    plain, none_ahead = run(core)
    core.overlap = True
    assert none_ahead == 0
    # the steps holding constrained rows went ahead, not only the free ones after them
    assert constrained_ahead > 10, constrained_ahead
    for c, p in zip(out, mixed_params()):
        if p.structured is REGEX:
            assert re.fullmatch(PATTERN, c.text) or (c.finish_reason == "length" and re.fullmatch(r"[0-9]+", c.text)), \
                c.text
        elif p.structured is JSON:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), SCHEMA)
    # a mask from a matcher one token behind would let another token through somewhere
    assert [c.token_ids for c in out] == [c.token_ids for c in plain]
    assert [c.finish_reason for c in out] == [c.finish_reason for c in plain]
    for c, d in zip(out, plain):
        assert (c.logprobs is None) == (d.logprobs is None)
        if c.logprobs is not None:
            assert c.logprobs == pytest.approx(d.logprobs, abs=1e-4)
    assert len(core.sampler.history._free) == core.sampler.history.output.shape[0]  # every slot given back


@pytest.mark.skipif(RUNTIME_DEVICE != "cpu", reason="on a CUDA artifact the real graphs are tested")
def test_constrained_steps_are_queued_ahead_and_sampled_after_the_tokens_on_cpu(runtime_artifact, monkeypatch):
    core = runtime.load_core(runtime_artifact, num_blocks=200, max_num_seqs=16, prefix_caching=False)
    core.graphs = emulated_decode_graphs(monkeypatch, core, 16, 512 // core.block_size)
    check(core)


@pytest.mark.gpu
@pytest.mark.skipif(RUNTIME_DEVICE != "cuda", reason="steps are queued ahead only with CUDA graphs")
def test_constrained_steps_are_queued_ahead_and_sampled_after_the_tokens(runtime_artifact):
    check(runtime.load_core(runtime_artifact, num_blocks=200, max_num_seqs=16, prefix_caching=False))
