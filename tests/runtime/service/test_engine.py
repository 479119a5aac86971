"""The engine on the artifact of the trained fixture (CPU; CUDA in scripts/gpu_check.sh): greedy output identical to
transformers alone and continuously batched, chunked prefill, preemption, sampling with
seeds, stop strings, eos, cancellation and streaming of non-ASCII text. Batching is driven
step by step on the EngineCore (`runtime.load_core`); what callers see, on the Engine."""

import dataclasses
import json
import shutil

import pytest
import torch

import greedy_reference as reference
from decode_graph_emulation import FakeGraph, emulated_decode_graphs
from suite_support import FIXTURE, RUNTIME_DEVICE, rel_err, train_text
from qwen3_aot import runtime
from qwen3_aot.custom_ops.dependent_launch import DEPENDENT_KERNELS
from qwen3_aot.runtime import SamplingParams
from greedy_reference import GREEDY, MAX_NEW, decode, prompts, tokenizer


@pytest.fixture(scope="module")
def engine(runtime_artifact):
    return runtime.load(runtime_artifact, num_blocks=200)  # room for all 16 at once: no preemption


@pytest.fixture(scope="module")
def hf_greedy() -> list[list[int]]:
    return reference.hf_greedy()


def test_greedy_alone_is_transformers_greedy(engine, hf_greedy):
    for p, want in zip(prompts(), hf_greedy):
        c = engine.generate(p, GREEDY)[0]
        assert c.token_ids == want and c.output_tokens == len(want)
        assert c.finish_reason == "length" and c.text == decode(want)
        assert c.prompt_tokens == len(tokenizer().encode(p).ids)
    assert engine.num_free_blocks == engine.stats().num_blocks


def recorded(core) -> list[runtime.StepRecord]:
    """What each forward the core queues holds, from here on."""
    steps: list[runtime.StepRecord] = []
    core.observers.append(steps.append)
    return steps


@pytest.fixture(scope="module")
def core(runtime_artifact):
    return runtime.load_core(runtime_artifact, num_blocks=200)


def arrive_and_run(engine, max_tokens: list[int]) -> list:
    """16 requests that arrive over the first steps (1, 2, 3, ... per step) and leave when done."""
    pending = list(zip(prompts(), max_tokens))
    requests, step = [], 0
    while pending or engine.has_unfinished():
        for _ in range(min(step + 1, len(pending))):
            p, m = pending.pop(0)
            requests.append(engine.add_request(p, dataclasses.replace(GREEDY, max_tokens=m)))
        engine.step()
        step += 1
    return requests


def check_batched(engine, hf_greedy, steps):
    max_tokens = [MAX_NEW - 8 * (k % 3) for k in range(16)]  # they also leave at different steps
    requests = arrive_and_run(engine, max_tokens)
    for r, want, m in zip(requests, hf_greedy, max_tokens):
        assert r.completion().token_ids == want[:m]
    assert max(r.decodes + r.prefills for r in steps) >= 8  # many sequences did share steps
    assert any(r.kind == "mixed" for r in steps)  # prefills and decodes in one step
    assert not engine.has_unfinished() and engine.num_free_blocks == engine.cache.num_blocks - 1


def test_continuous_batching_does_not_change_greedy(core, hf_greedy):
    check_batched(core, hf_greedy, recorded(core))
    assert core.scheduler.num_preemptions == 0


def test_chunked_prefill_does_not_change_greedy(runtime_artifact, hf_greedy):
    small_steps = runtime.load_core(runtime_artifact, num_blocks=200, max_num_batched_tokens=24)
    steps = recorded(small_steps)
    check_batched(small_steps, hf_greedy, steps)
    assert any(r.chunked for r in steps)  # a prompt continued in a later step


def test_preemption_completes_every_request_with_the_same_output(runtime_artifact, hf_greedy):
    small = runtime.load(runtime_artifact, num_blocks=17)  # 256 tokens for 16 requests of up to 127
    out = small.generate(prompts(), GREEDY)
    assert small.stats().num_preemptions > 0
    assert [c.token_ids for c in out] == hf_greedy
    assert small.num_free_blocks == 16 and not small.has_unfinished()


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates(engine):
    p = prompts()[5]
    hot = SamplingParams(max_tokens=24, temperature=2.0, seed=7)
    alone = engine.generate(p, hot)[0].token_ids
    assert engine.generate(p, hot)[0].token_ids == alone
    torch.manual_seed(123)  # the global RNG plays no part
    mates = [SamplingParams(max_tokens=30, temperature=1.0), SamplingParams(max_tokens=5, top_k=3, temperature=2.0),
             hot, GREEDY, dataclasses.replace(hot, seed=8, top_p=0.9)]
    batched = engine.generate([prompts()[0], prompts()[9], p, prompts()[2], p], mates)
    assert batched[2].token_ids == alone
    by_seed = {tuple(engine.generate(p, dataclasses.replace(hot, seed=s))[0].token_ids) for s in range(4)}
    assert len(by_seed) > 1  # it does sample


def test_top_k_1_is_greedy(engine, hf_greedy):
    params = SamplingParams(max_tokens=MAX_NEW, temperature=1.5, top_k=1, seed=3)
    assert [c.token_ids for c in engine.generate(prompts()[:4], params)] == hf_greedy[:4]


def test_logprobs_are_the_models_log_softmax(engine):
    from transformers import Qwen3ForCausalLM

    ids = tokenizer().encode(prompts()[3]).ids
    c = engine.generate(ids, SamplingParams(max_tokens=8, temperature=1.0, seed=1, logprobs=True))[0]
    hf = Qwen3ForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids + c.token_ids])).logits[0, len(ids) - 1:-1]
    want = torch.log_softmax(logits, -1)[torch.arange(8), torch.tensor(c.token_ids)]
    assert len(c.logprobs) == 8 and torch.allclose(torch.tensor(c.logprobs), want, atol=1e-4)
    assert engine.generate(ids, SamplingParams(max_tokens=2))[0].logprobs is None


@pytest.mark.parametrize("span", ["tokens", "mid-token"])
def test_stop_string_cuts_the_text_exactly(engine, span):
    p = prompts()[6]
    full = engine.generate(p, GREEDY)[0]
    if span == "tokens":  # exactly the text of output tokens 6..8
        stop = decode(full.token_ids[6:9])
    else:  # starts and ends inside tokens
        stop = full.text[len(decode(full.token_ids[:6])) + 1:len(decode(full.token_ids[:9])) - 1]
    assert len(stop) >= 3
    want = full.text[:full.text.index(stop)]
    params = dataclasses.replace(GREEDY, stop=("never seen", stop))
    c = engine.generate(p, params)[0]
    assert c.text == want and c.finish_reason == "stop"
    assert 6 < len(c.token_ids) < MAX_NEW and c.token_ids == full.token_ids[:len(c.token_ids)]
    assert stop in decode(c.token_ids) and stop not in decode(c.token_ids[:-1])  # stopped at the first chance
    assert "".join(engine.stream(p, params)) == want


def test_stop_token_ids_end_the_request(engine, hf_greedy):
    want = hf_greedy[7]
    stop_token = want[5]
    k = want.index(stop_token)
    c = engine.generate(prompts()[7], dataclasses.replace(GREEDY, stop_token_ids=(stop_token,)))[0]
    assert c.token_ids == want[:k + 1] and c.finish_reason == "stop"
    assert c.text == decode(want[:k])  # the stop token is not in the text


def test_eos_from_generation_config_and_ignore_eos(runtime_artifact, hf_greedy, tmp_path):
    art = shutil.copytree(runtime_artifact, tmp_path / "eos")
    want = hf_greedy[4]
    eos = want[10]
    (art / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, eos]}))
    eng = runtime.load(art, verify_files=False, num_blocks=20)
    c = eng.generate(prompts()[4], GREEDY)[0]
    k = want.index(eos)
    assert c.token_ids == want[:k + 1] and c.finish_reason == "stop" and c.text == decode(want[:k])
    assert eng.generate(prompts()[4], dataclasses.replace(GREEDY, ignore_eos=True))[0].token_ids == want


def test_streaming_never_splits_a_character(engine):
    text = train_text()
    end = text.index(" “starred”")  # the model continues with the curly quotes, 2 tokens each
    p = text[text.rindex("\n", 0, end - 30):end]
    params = SamplingParams(max_tokens=12, temperature=0)
    c = engine.generate(p, params)[0]
    assert "“starred”" in c.text
    assert any("\ufffd" in decode([t]) for t in c.token_ids)  # a character did span tokens
    pieces = list(engine.stream(p, params))
    assert all("\ufffd" not in piece for piece in pieces) and "".join(pieces) == c.text


def test_stream_returns_the_completion(engine):
    s = engine.stream(prompts()[1], SamplingParams(max_tokens=5, temperature=0))
    pieces = []
    with pytest.raises(StopIteration) as stop:
        while True:
            pieces.append(next(s))
    c = stop.value.value
    assert c.text == "".join(pieces) and c.output_tokens == 5 and c.finish_reason == "length"


@pytest.mark.skipif(RUNTIME_DEVICE != "cpu", reason="on a CUDA artifact the real graphs are tested")
def test_decode_graph_inputs_and_padding_on_cpu(runtime_artifact, hf_greedy, monkeypatch):
    """DecodeGraphs' static buffers, padding to the captured sizes and the reserved block,
    with the graph emulated on CPU (real CUDA graphs need a GPU: scripts/gpu_check.sh)."""
    from qwen3_aot.runtime.forward.kv_cache import RESERVED_BLOCK

    eng = runtime.load_core(runtime_artifact, num_blocks=200, max_num_seqs=6)
    graphs = emulated_decode_graphs(monkeypatch, eng, 6, 512 // eng.block_size)
    assert graphs.sizes == [1, 2, 4, 6]
    batch_sizes, ahead = [], []
    replay, from_device = graphs._replay, graphs.decode_from_device

    def checked_replay(pos, tables, with_ids):
        batch_sizes.append(len(pos))
        logits = replay(pos, tables, with_ids)
        n, b = len(pos), next(s for s in graphs.sizes if s >= len(pos))
        # padding rows: position 0 of the reserved block, never a live sequence's block
        assert (graphs.tables[n:b, 0] == RESERVED_BLOCK).all() and (graphs.pos[n:b] == 0).all()
        assert (graphs.ids[n:b] == 0).all()
        return logits

    def counted_from_device(ids, rows, pos, tables):
        ahead.append((len(pos), rows is not None))
        return from_device(ids, rows, pos, tables)

    graphs._replay, graphs.decode_from_device = checked_replay, counted_from_device
    eng.graphs = graphs
    FakeGraph.replays = 0
    max_tokens = [MAX_NEW - 3 * (k % 5) for k in range(16)]  # leaving at different steps: odd batch sizes
    requests = arrive_and_run(eng, max_tokens)
    assert [r.completion().token_ids for r in requests] == [w[:m] for w, m in zip(hf_greedy, max_tokens)]
    assert FakeGraph.replays == len(batch_sizes) > MAX_NEW
    assert {3, 5} & set(batch_sizes)  # padded to 4 or 6, the padding rows decoding into the reserved block
    # with overlap, most decode steps were queued before the step before gave its tokens,
    # some of them after a request had ended there (its row gathered out of the ids)
    assert len(ahead) > MAX_NEW // 2 and len({n for n, _ in ahead}) > 3 and any(g for _, g in ahead)
    # no step is queued for a request that ends by max_tokens on the token in flight
    for max_tokens, queued in ((1, []), (2, [(1, False)])):
        ahead.clear()
        eng.generate(prompts()[0], dataclasses.replace(GREEDY, max_tokens=max_tokens))
        assert ahead == queued


@pytest.mark.skipif(RUNTIME_DEVICE != "cuda", reason="needs a CUDA artifact (QWEN3_AOT_RUNTIME_DEVICE=cuda)")
def test_cuda_graphs_replay_decode_steps_with_the_same_output(runtime_artifact, hf_greedy):
    max_tokens = [MAX_NEW - 3 * (k % 5) for k in range(16)]  # leaving at different steps: odd batch sizes
    outputs = {}
    for graphs, overlap in ((True, True), (True, False), (False, True)):
        eng = runtime.load_core(runtime_artifact, num_blocks=200, max_num_seqs=16, cuda_graphs=graphs,
                                overlap=overlap)
        assert (eng.graphs is not None) == graphs
        steps = recorded(eng)
        requests = arrive_and_run(eng, max_tokens)
        outputs[graphs, overlap] = [r.completion().token_ids for r in requests]
        # every step of decodes only (one token per sequence, its last) is a replay, of its batch
        # size: the scheduled ones, and with overlap the ones queued ahead of their inputs
        decodes = [r for r in steps if r.kind == "decode"]
        assert all(r.replayed == graphs for r in decodes) and not any(r.replayed for r in steps if r.prefills)
        ahead = [r for r in steps if r.ahead]
        assert len({r.decodes for r in decodes}) > 3 and (len(ahead) > MAX_NEW // 2) == (graphs and overlap)
        if graphs:  # the tiny model's small decode batches run faster through the small-batch graph,
            # tried from batch 1 up until it first loses
            assert eng.graphs.small_batch_sizes[:1] == [1] and eng.graphs.small_batch_sizes == eng.graphs.sizes[:len(eng.graphs.small_batch_sizes)]
            # from Hopper on, its projections start early, within the graph (runtime/forward/dependent_launch.py)
            hopper = torch.cuda.get_device_capability()[0] >= 9
            assert eng.forward.dependent_kernels == (DEPENDENT_KERNELS if hopper else ())
            assert (eng.graphs.dependent_edges > 0) == hopper
    want = [w[:m] for w, m in zip(hf_greedy, max_tokens)]
    assert outputs[True, True] == outputs[True, False] == outputs[False, True] == want


@pytest.mark.skipif(RUNTIME_DEVICE != "cuda", reason="needs a CUDA artifact (QWEN3_AOT_RUNTIME_DEVICE=cuda)")
def test_dependent_launch_changes_no_logit(runtime_artifact):
    """The same decode steps through graphs captured with and without the programmatic edges
    give bitwise the same logits, at every batch both replay the small-batch graph for: a kernel
    that read its input before the kernel ahead wrote it would differ. Each row has a block of
    its own (rows sharing one cache slot would race whichever way the edges are)."""
    import numpy as np

    from qwen3_aot.runtime.forward.decode_graphs import DecodeGraphs

    eng = runtime.load_core(runtime_artifact, num_blocks=200, max_num_seqs=16)
    linked = eng.graphs
    if not linked.dependent_edges:
        pytest.skip("this GPU has no programmatic dependent launch (before Hopper)")
    plain = DecodeGraphs(eng.forward, eng.cache, linked.max_batch, linked.tables.shape[1], eng.device,
                         dependent_launch=False)
    both = sorted(set(linked.small_batch_sizes) & set(plain.small_batch_sizes))
    assert both[:1] == [1] and plain.dependent_edges == 0
    for n in both:
        tables = np.zeros((n, linked.tables.shape[1]), dtype=np.int32)
        tables[:, 0] = np.arange(1, n + 1)
        for pos in (0, 1, 2):  # each step reads the cache the steps before wrote
            ids = [(7 * r + pos) % 64 + 1 for r in range(n)]
            assert torch.equal(*(g(ids, [pos] * n, tables).clone() for g in (linked, plain))), (n, pos)


@pytest.mark.skipif(RUNTIME_DEVICE != "cuda", reason="needs a CUDA artifact (QWEN3_AOT_RUNTIME_DEVICE=cuda)")
def test_small_batch_graph_computes_what_the_main_graph_computes(runtime_artifact):
    """The two graphs of a CUDA artifact on the build check's steps (prompts in one step, then
    decode steps of four sequences), each with its own cache: fp32 logits within 1e-5 (the
    build's verify bounds each against float64)."""
    from qwen3_aot import manifest
    from qwen3_aot.build.pipeline import SMALL_BATCH_MAX, check_logits, check_sequences
    from qwen3_aot.config import Qwen3Config
    from qwen3_aot.driver import FlatBatchDriver

    forward = runtime.load_forward(runtime_artifact)
    assert forward.small_batch_graph is not None and forward.small_batch_max == SMALL_BATCH_MAX
    man = manifest.read(runtime_artifact)
    cfg, block_size = Qwen3Config.from_dict(man["model_config"]), man["kv_cache"]["block_size"]
    seqs = check_sequences(cfg.vocab_size, block_size, man["limits"]["max_model_len"])
    with torch.inference_mode():
        main, small = (check_logits(FlatBatchDriver(f, cfg, torch.float32, torch.device("cuda"), block_size), *seqs)
                       for f in (forward, forward.small_batch_graph))
    assert rel_err(small, main) <= 1e-5
