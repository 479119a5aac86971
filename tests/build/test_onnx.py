"""The ONNX artifact: a valid opset-23 graph built from our ops' translations, weights as
external data, and onnxruntime (CPU provider) computing what the eager model and
transformers compute, prefill and decode through the past/present KV tensors alike."""

import json
import sys

import numpy as np
import onnx
import pytest
import torch

from random_checkpoints import write_random_checkpoint
from suite_support import FIXTURE, prompt_ids, rel_err
from qwen3_aot import Qwen3AotError, manifest
from qwen3_aot.build import export
from qwen3_aot.build.onnx_graph import OnnxQwen3
from qwen3_aot.cli import main as cli
from qwen3_aot.driver import FlatBatchDriver
from qwen3_aot.model import Qwen3ForCausalLM
from qwen3_aot.runtime import load_forward
from qwen3_aot.runtime.onnx.onnx_forward import OnnxForward, import_onnxruntime

QUIET = dict(device="cpu", formats=("onnx",), log=lambda _m: None)
pytestmark = pytest.mark.xdist_group("test_onnx")  # one pytest-xdist worker exports the module's artifacts


def prompts() -> list[list[int]]:
    """Four slices of the fixture's training text of different lengths (`prompt_ids`)."""
    return prompt_ids([(3000, 20), (15000, 60), (30000, 35), (52000, 90)])


def open_onnx(artifact) -> OnnxForward:
    return OnnxForward(artifact, manifest.read(artifact), device="cpu")


@pytest.fixture(scope="module")
def fixture_model():
    return Qwen3ForCausalLM.from_pretrained(FIXTURE, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def onnx_artifact(tiny_onnx_artifact):
    return tiny_onnx_artifact


@pytest.fixture(scope="module")
def fwd(onnx_artifact) -> OnnxForward:
    return open_onnx(onnx_artifact)


@pytest.fixture(scope="module")
def extreme_ckpt(tmp_path_factory):
    """A random untied checkpoint whose k_norm weights reach 200 (Qwen3-0.6B: 96.5)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("extreme") / "ckpt", seed=3, k_norm_max=200.0, tie=False)


@pytest.fixture(scope="module")
def extreme(extreme_ckpt):
    """(eager model, onnxruntime forward) of the extreme checkpoint in fp32."""
    art = export(extreme_ckpt, extreme_ckpt.parent / "onnx", dtype="float32", **QUIET)
    return Qwen3ForCausalLM.from_pretrained(extreme_ckpt, dtype="float32", device="cpu"), open_onnx(art)


def graph(artifact) -> onnx.GraphProto:
    return onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# ---- the graph and the artifact ----

def test_graph_is_checked_opset23_with_the_standard_ops(onnx_artifact, fixture_model):
    onnx.checker.check_model(str(onnx_artifact / "model.onnx"), full_check=True)
    model = onnx.load(str(onnx_artifact / "model.onnx"), load_external_data=False)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 23)]
    nodes = model.graph.node
    assert {n.domain for n in nodes} == {""}  # every custom op was translated to standard ONNX
    count = lambda t: sum(n.op_type == t for n in nodes)  # noqa: E731
    layers, cfg = fixture_model.config.num_hidden_layers, fixture_model.config
    # input, post, q and k norms per layer + the final norm; RoPE on q and k; one attention
    assert count("RMSNormalization") == 4 * layers + 1
    assert (count("RotaryEmbedding"), count("Attention")) == (2 * layers, layers)
    assert count("Transpose") == 0 and count("MatMul") == 0  # Gemm on [out, in] weights, no transposed copies
    for n in nodes:
        a = attrs(n)
        if n.op_type == "RMSNormalization":
            assert a["epsilon"] == pytest.approx(cfg.rms_norm_eps, rel=1e-6) and a["axis"] == -1
            assert a.get("stash_type", 1) == 1
        elif n.op_type == "RotaryEmbedding":
            assert a.get("interleaved", 0) == 0 and len(n.input) == 3  # rotate-half, cos/sin per token
        elif n.op_type == "Attention":
            assert a.get("is_causal", 0) == 0 and n.input[3] and a["softmax_precision"] == onnx.TensorProto.FLOAT
            assert n.input[4].startswith("past_key_") and n.output[1].startswith("present_key_")


def test_weights_are_external_data(onnx_artifact, fixture_model):
    g = graph(onnx_artifact)
    big = [t for t in g.initializer if np.prod(t.dims) * 4 > 1024]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert all(dict((e.key, e.value) for e in t.external_data)["location"] == "model.onnx.data" for t in big)
    weights = sum(p.numel() * p.element_size() for p in fixture_model.parameters())
    assert (onnx_artifact / "model.onnx.data").stat().st_size >= weights
    inline = [t for t in g.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert sum(len(t.raw_data) + 4 * len(t.float_data) for t in inline) < 8192  # a few small vectors
    assert (onnx_artifact / "model.onnx").stat().st_size < weights / 4
    assert not (onnx_artifact / "weights.safetensors").exists()  # an onnx-only artifact stores them once


def test_manifest_documents_the_onnx_graph(onnx_artifact, fixture_model):
    man = json.loads((onnx_artifact / "manifest.json").read_text())
    entry, cfg = man["graphs"]["onnx"], fixture_model.config
    assert "forward" not in man["graphs"] and {"model.onnx", "model.onnx.data"} <= set(man["files"])
    assert (entry["file"], entry["external_data"], entry["opset"]) == ("model.onnx", "model.onnx.data", 23)
    specs = {s["name"]: (s["shape"], s["dtype"]) for s in entry["inputs"] + entry["outputs"]}
    n = cfg.num_hidden_layers
    assert list(specs)[:4] == ["input_ids", "position_ids", "attention_mask", "logits_indices"]
    assert len(entry["inputs"]) == 4 + 2 * n and len(entry["outputs"]) == 1 + 2 * n
    assert specs["input_ids"] == (["batch", "seq"], "int64")
    assert specs["logits"] == (["batch", "logit_cols", cfg.vocab_size], "float32")
    kv = ["batch", cfg.num_key_value_heads, "past", cfg.head_dim]
    for i in range(n):
        assert specs[f"past_key_{i}"] == specs[f"past_value_{i}"] == (kv, "float32")
        shape, dtype = specs[f"present_value_{i}"]
        assert dtype == "float32" and shape[:2] == kv[:2] and shape[3] == kv[3] and isinstance(shape[2], str)
    assert entry["kv_cache"]["layout"] == ["batch", "kv_heads", "past", "head_dim"]


def test_runs_on_the_cpu_provider(fwd):
    assert fwd.session.get_providers() == ["CPUExecutionProvider"] and fwd.provider == "CPUExecutionProvider"


# ---- numerics ----

def test_fixture_logits_match_eager(fwd, fixture_model):
    seqs = prompts() + [[7]]  # five lengths, 1 to 38 tokens: left padding and its mask
    got, want = fwd.logits(seqs), FlatBatchDriver.of(fixture_model).logits(seqs)
    assert [len(g) for g in got] == [len(s) for s in seqs]
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-4


def test_extreme_k_norm_logits_match_eager(extreme):
    model, fwd = extreme
    assert model.config.tie_word_embeddings is False
    assert max(float(layer.k_norm.max()) for layer in model.layers) == 200.0
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 40, 17, 64)]
    for got, want in zip(fwd.logits(seqs), FlatBatchDriver.of(model).logits(seqs)):
        assert rel_err(got, want) <= 1e-4


def test_greedy_continuation_identical_to_transformers(fwd):
    from transformers import Qwen3ForCausalLM as HF

    hf = HF.from_pretrained(FIXTURE, dtype=torch.float32).eval()
    seqs = prompts()
    want = [hf.generate(torch.tensor([s]), do_sample=False, max_new_tokens=32, min_new_tokens=32)[0, len(s):].tolist()
            for s in seqs]
    assert fwd.generate_greedy(seqs, 32) == want  # one left-padded batch, decoded in lockstep


@pytest.mark.parametrize("past", [1, 7, 16, 33])
def test_steps_through_the_past_cache_match_a_full_recompute(extreme, past):
    """A chunk of 3 tokens, then a decode step, after a cache of `past` tokens; the second row's
    cache holds 5 tokens more, so the first row's is left-padded. A mask aligned top-left (as
    is_causal can be with a past) or a padded slot let through shows up as an O(1) error."""
    model, fwd = extreme
    g = torch.Generator().manual_seed(past)
    rows = [torch.randint(0, model.config.vocab_size, (past + extra + 4,), generator=g).tolist() for extra in (0, 5)]
    _, state = fwd.prefill([r[:-4] for r in rows])
    assert state.length == past + 5
    chunk, state = fwd.extend(state, [r[-4:-1] for r in rows], all_logits=True)
    step, state = fwd.extend(state, [r[-1:] for r in rows])
    assert state.length == past + 9 and state.next_positions.tolist() == [len(r) for r in rows]
    got = torch.cat([chunk, step[:, None]], dim=1)
    for row, full, eager in zip(got, fwd.logits(rows), FlatBatchDriver.of(model).logits(rows)):
        assert rel_err(row, full[-4:]) <= 1e-5
        assert rel_err(row, eager[-4:]) <= 1e-4


def test_exported_module_and_onnxruntime_agree(extreme):
    """The torch module that was exported (with its stand-in attention op) and onnxruntime
    compute the same logits and presents: a left-padded prefill (its padding rows must stay
    finite in both), then a 2-token step through that cache."""
    model, fwd = extreme
    module, t = OnnxQwen3(model), torch.from_numpy
    ids = np.array([[5, 6, 7, 8, 9, 10, 11], [0, 0, 0, 0, 12, 13, 14]])
    mask = (np.arange(7) >= np.array([[0], [4]])).astype(np.int64)
    pos = np.maximum(mask.cumsum(1) - 1, 0)
    ort_past = fwd.empty_state(2).past
    eager_past = [torch.zeros(2, model.config.num_key_value_heads, 0, model.config.head_dim)] * len(ort_past)
    for step_ids in (None, np.array([[20, 21], [22, 23]])):
        if step_ids is not None:
            ids, pos = step_ids, pos[:, -1:] + 1 + np.arange(2)
            mask = np.concatenate([mask, np.ones((2, 2), np.int64)], axis=1)
        cols = np.arange(ids.shape[1])
        got, ort_past = fwd.run(ids, pos, mask, cols, ort_past)
        with torch.no_grad():
            want, *eager_past = module(t(ids), t(pos), t(mask), t(cols), eager_past)
        assert rel_err(got, want) <= 1e-5
        for o, e in zip(ort_past, eager_past):
            assert o.shape() == list(e.shape) and rel_err(t(o.numpy()), e) <= 1e-5


# ---- dtypes, formats, errors ----

def test_float16_runs_on_cpu_and_keeps_the_greedy_tokens(tmp_path, fwd):
    art = export(FIXTURE, tmp_path / "fp16", dtype="float16", **QUIET)  # verified within 5e-3
    fp16 = open_onnx(art)
    assert fp16.dtype == "float16"
    assert fp16.generate_greedy(prompts(), 32) == fwd.generate_greedy(prompts(), 32)


def test_float16_extreme_k_norm_no_worse_than_transformers(tmp_path, extreme_ckpt):
    """k_norm weights of 200: fp32 norm + RoPE and an fp32 softmax keep fp16 logits at least
    as close to float64 as transformers' fp16 model."""
    from transformers import Qwen3ForCausalLM as HF

    ckpt = extreme_ckpt
    fp16 = open_onnx(export(ckpt, tmp_path / "fp16", dtype="float16", **QUIET))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, fp16.vocab_size, (n,), generator=g).tolist() for n in (3, 40, 17, 64)]

    def hf_logits(dtype):
        hf = HF.from_pretrained(ckpt, dtype=dtype, attn_implementation="eager").eval()
        with torch.inference_mode():
            return torch.cat([hf(torch.tensor([s])).logits[0] for s in seqs])

    exact = hf_logits(torch.float64)
    assert rel_err(torch.cat(fp16.logits(seqs)), exact) <= rel_err(hf_logits(torch.float16), exact)


def test_bfloat16_is_refused_on_cpu_with_advice(tmp_path):
    """onnxruntime's CPU provider has no bfloat16 Gemm: the build's check and the runtime say
    what to do instead of onnxruntime's NOT_IMPLEMENTED."""
    from qwen3_aot.build.onnx_export import verify_onnx

    art = export(FIXTURE, tmp_path / "bf16", dtype="bfloat16", check=False, **QUIET)
    model = Qwen3ForCausalLM.from_pretrained(FIXTURE, dtype="bfloat16", device="cpu")
    with pytest.raises(Qwen3AotError, match="bfloat16.*--dtype float16"):
        verify_onnx(art, manifest.read(art)["graphs"]["onnx"], model, lambda _m: None)
    with pytest.raises(Qwen3AotError, match="bfloat16.*--dtype float16"):
        open_onnx(art)


def test_pt2_and_onnx_in_one_artifact(tmp_path, capsys, fixture_model):
    out = tmp_path / "both"
    assert cli(["export", str(FIXTURE), "-o", str(out), "--device", "cpu", "--dtype", "float32",
                "--format", "pt2,onnx"]) == 0
    err = capsys.readouterr().err  # both graphs were checked against eager
    assert "[verify] compiled vs eager" in err and "[verify onnx] onnxruntime" in err
    man = manifest.read(out)
    assert set(man["graphs"]) == {"forward", "onnx"}
    assert {"model.pt2", "model.onnx", "model.onnx.data", "weights.safetensors"} <= set(man["files"])
    seqs = [[3, 1, 4, 1, 5, 9, 2, 6]]
    pt2 = FlatBatchDriver(load_forward(out), fixture_model.config, torch.float32, "cpu")
    assert rel_err(open_onnx(out).logits(seqs)[0], pt2.logits(seqs)[0]) <= 1e-4


def test_artifact_without_onnx_graph_is_refused(tmp_path):
    with pytest.raises(Qwen3AotError, match="--format onnx"):
        OnnxForward(tmp_path, {"graphs": {"forward": {"file": "model.pt2"}}})


def test_missing_onnxruntime_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(Qwen3AotError, match=r"qwen3-aot\[onnx\]"):
        import_onnxruntime()


def test_bad_steps_are_refused(fwd):
    _, state = fwd.prefill([[1, 2, 3], [4, 5]])
    with pytest.raises(Qwen3AotError, match="batch=2"):
        fwd.extend(state, [[6]])
    with pytest.raises(Qwen3AotError, match="max_position_embeddings"):
        fwd.generate_greedy([[1, 2]], fwd.max_positions - 1)
    with pytest.raises(Qwen3AotError, match="max_position_embeddings"):
        fwd.prefill([[1] * (fwd.max_positions + 1)])
    with pytest.raises(Qwen3AotError, match="at least one token"):
        fwd.prefill([[1], []])
