"""The overlap rule of structured outputs, where overlap happens (CUDA graphs): a step
holding a constrained row is never queued ahead of the tokens of the step before (its mask
needs them), while steps of free rows still are. On CPU no step is queued ahead at all."""

from __future__ import annotations

import re

import pytest

from qwen3_aot import runtime
from qwen3_aot.runtime import SamplingParams
from qwen3_aot.runtime.core.structured_output import StructuredOutput
from suite_support import RUNTIME_DEVICE

pytest.importorskip("xgrammar")
PATTERN = r"[0-9]{4,40}x"


@pytest.mark.gpu
@pytest.mark.skipif(RUNTIME_DEVICE != "cuda", reason="steps are queued ahead only with CUDA graphs")
def test_constrained_steps_are_never_queued_ahead(runtime_artifact):
    core = runtime.load_core(runtime_artifact, overlap=True)
    records: list = []
    core.observers.append(records.append)
    free = core.generate(["The"] * 4, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert any(r.ahead for r in records), "free decode steps go ahead"
    records.clear()
    out = core.generate(["The"] * 4, [SamplingParams(max_tokens=24, seed=i, structured=StructuredOutput(
        regex=PATTERN)) for i in range(4)])
    assert records and not any(r.ahead for r in records)
    for c in out:  # a mask from a matcher a token behind would let a wrong token through
        assert re.fullmatch(PATTERN, c.text) or (c.finish_reason == "length" and re.fullmatch(r"[0-9]+", c.text))
    assert all(c.output_tokens == 24 for c in free)
