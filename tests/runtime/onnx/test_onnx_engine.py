"""runtime.load() of an ONNX artifact: the OnnxEngine behind the same generate / stream API,
on onnxruntime's CPU provider, statically batched. Greedy output identical to transformers
alone and in batches whose requests end at different steps; sampling, stop strings,
streaming, cancelling, and what it refuses."""

import dataclasses

import pytest
import torch

from qwen3_aot import Qwen3AotError, runtime
from qwen3_aot.cli import main as cli
from qwen3_aot.runtime import OnnxEngine, SamplingParams
import greedy_reference as reference
from greedy_reference import GREEDY, MAX_NEW, decode, prompts, tokenizer

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def engine(tiny_onnx_artifact) -> OnnxEngine:
    return runtime.load(tiny_onnx_artifact)


@pytest.fixture(scope="module")
def hf_greedy() -> list[list[int]]:
    return reference.hf_greedy()


def test_load_opens_an_onnx_only_artifact_with_the_onnx_engine(engine):
    assert isinstance(engine, OnnxEngine) and engine.forward.provider == "CPUExecutionProvider"


def test_greedy_alone_is_transformers_greedy(engine, hf_greedy):
    for p, want in list(zip(prompts(), hf_greedy))[::3]:
        c = engine.generate(p, GREEDY)[0]
        assert c.token_ids == want and c.finish_reason == "length" and c.text == decode(want)
        assert c.prompt_tokens == len(tokenizer().encode(p).ids) and c.output_tokens == MAX_NEW


def test_static_batches_do_not_change_greedy(tiny_onnx_artifact, hf_greedy):
    """16 prompts of 3 to 95 tokens in batches of 5 (left-padded), leaving at different steps."""
    eng = runtime.load(tiny_onnx_artifact, max_batch_size=5)
    max_tokens = [MAX_NEW - 7 * (k % 4) for k in range(16)]
    out = eng.generate(prompts(), [dataclasses.replace(GREEDY, max_tokens=m) for m in max_tokens])
    assert [c.token_ids for c in out] == [w[:m] for w, m in zip(hf_greedy, max_tokens)]
    assert [c.finish_reason for c in out] == ["length"] * 16


def test_sampling_is_seeded_and_top_k_1_is_greedy(engine, hf_greedy):
    hot = SamplingParams(max_tokens=16, temperature=2.0, seed=7)
    alone = engine.generate(prompts()[5], hot)[0].token_ids
    torch.manual_seed(1)  # the global RNG plays no part
    batched = engine.generate([prompts()[0], prompts()[5]], [SamplingParams(max_tokens=4), hot])
    assert batched[1].token_ids == alone
    assert len({tuple(engine.generate(prompts()[5], dataclasses.replace(hot, seed=s))[0].token_ids)
                for s in range(4)}) > 1
    top1 = SamplingParams(max_tokens=MAX_NEW, temperature=1.5, top_k=1, seed=3)
    assert [c.token_ids for c in engine.generate(prompts()[:3], top1)] == hf_greedy[:3]


def test_logprobs_match_the_pt2_engine(engine, tiny_artifact):
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=True)
    ours = engine.generate(prompts()[3], params)[0]
    pt2 = runtime.load(tiny_artifact, num_blocks=20).generate(prompts()[3], params)[0]
    assert ours.token_ids == pt2.token_ids
    assert torch.allclose(torch.tensor(ours.logprobs), torch.tensor(pt2.logprobs), atol=1e-4)


def test_stop_strings_and_eos(engine, hf_greedy):
    full = engine.generate(prompts()[6], GREEDY)[0]
    stop = decode(full.token_ids[6:9])
    c = engine.generate(prompts()[6], dataclasses.replace(GREEDY, stop=(stop,)))[0]
    assert c.text == full.text[:full.text.index(stop)] and c.finish_reason == "stop"
    want = hf_greedy[7]
    c = engine.generate(prompts()[7], dataclasses.replace(GREEDY, stop_token_ids=(want[5],)))[0]
    assert c.token_ids == want[:want.index(want[5]) + 1] and c.finish_reason == "stop"


def test_stream_yields_the_text_and_returns_the_completion(engine, hf_greedy):
    s = engine.stream(prompts()[1], GREEDY)
    pieces = []
    with pytest.raises(StopIteration) as stop:
        while True:
            pieces.append(next(s))
    assert "".join(pieces) == stop.value.value.text == decode(hf_greedy[1]) and len(pieces) > 1
    early = engine.stream(prompts()[2], GREEDY)
    next(early)
    early.close()  # cancelled: nothing left running, the engine still serves
    assert engine.generate(prompts()[2], GREEDY)[0].token_ids == hf_greedy[2]


BAD = {
    "empty prompt": lambda e: e.generate(""),
    "past max_position_embeddings": lambda e: e.generate("x", dataclasses.replace(GREEDY, max_tokens=10**6)),
    "id past the vocab": lambda e: e.generate([[5, 10**6]]),
    "params count": lambda e: e.generate(["x", "y"], [GREEDY]),
    "stream, empty": lambda e: e.stream(""),
}


@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
def test_bad_request_is_refused_and_the_engine_keeps_serving(engine, hf_greedy, bad):
    with pytest.raises(Qwen3AotError):
        bad(engine)
    assert engine.generate(prompts()[0], GREEDY)[0].token_ids == hf_greedy[0]


@pytest.mark.parametrize("options, needle", [
    (dict(num_blocks=20), "not options of the onnx engine"),
    (dict(max_batch_size=0), "max_batch_size"),
    (dict(format="pt2"), "holds no pt2 graph"),
    (dict(format="tflite"), "not one of"),
    (dict(device="cuda"), "CUDA provider"),
])
def test_load_refuses_bad_options(tiny_onnx_artifact, options, needle):
    with pytest.raises(Qwen3AotError, match=needle):
        runtime.load(tiny_onnx_artifact, **options)


def test_a_pt2_only_artifact_refuses_format_onnx(tiny_artifact):
    with pytest.raises(Qwen3AotError, match="holds no onnx graph"):
        runtime.load(tiny_artifact, format="onnx")


def test_generate_command_runs_an_onnx_artifact(tiny_onnx_artifact, hf_greedy, capsys):
    prompt = prompts()[4]
    assert cli(["generate", str(tiny_onnx_artifact), prompt, "--max-tokens", "12"]) == 0
    assert capsys.readouterr().out == prompt + decode(hf_greedy[4][:12]) + "\n"


def test_structured_outputs_hold_on_the_onnx_engine(engine):
    """The trained model writes its training text; a regex and a choice force something else,
    and the logprobs stay those of the model's own distribution (greedy: the free run's first)."""
    import re

    pytest.importorskip("xgrammar")
    from qwen3_aot.runtime.core.structured_output import StructuredOutput

    prompt = prompts()[0]
    free = engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=True))[0]
    out = engine.generate([prompt] * 3, [SamplingParams(max_tokens=12, seed=i, logprobs=True,
                                                        structured=StructuredOutput(regex=r"[0-9]{2}-[a-c]{2}"))
                                         for i in range(3)])
    assert all(c.finish_reason == "stop" and re.fullmatch(r"[0-9]{2}-[a-c]{2}", c.text) for c in out), out
    pick = engine.generate(prompt, SamplingParams(max_tokens=4, temperature=0, logprobs=True,
                                                  structured=StructuredOutput(choice=[free.text, "zz"])))[0]
    assert pick.text == free.text and pick.logprobs[0] == pytest.approx(free.logprobs[0], abs=1e-5)
