"""FP8 checkpoints (Qwen's block FP8, compressed-tensors) and `--quantize fp8`: read, exported,
loaded, and compared with transformers' float64 model of the dequantized weights; refusals
leave nothing behind; the manifest's record of the quantization is checked at load."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from artifact_damage import edit_manifest
from fp8_checkpoints import float64_reference, write_bf16, write_block_fp8, write_compressed_tensors
from greedy_reference import prompts, tokenizer
from random_checkpoints import write_random_checkpoint
from qwen3_aot import Qwen3AotError, manifest, runtime
from qwen3_aot.build import export, pipeline
from qwen3_aot.driver import FlatBatchDriver
from qwen3_aot.model import OPS, Qwen3ForCausalLM
from qwen3_aot.runtime import SamplingParams
from qwen3_aot.weights import load_checkpoint

pytestmark = pytest.mark.xdist_group("fp8_artifact")  # one worker builds the FP8 artifact for the module
NEW_TOKENS = 10
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
PROMPTS = 4


@pytest.fixture(scope="module")
def block_fp8(tmp_path_factory):
    return write_block_fp8(tmp_path_factory.mktemp("fp8") / "block-fp8")


@pytest.fixture(scope="module")
def fp8_artifact(tmp_path_factory, block_fp8):
    """The block-FP8 checkpoint as a CPU artifact, with the build's verify (about 30 s); in fp32,
    so that its greedy tokens are compared with float64 through fp32's roundings, not bf16's."""
    return export(block_fp8, tmp_path_factory.mktemp("artifacts") / "tiny-fp8", device="cpu", dtype="float32",
                  log=lambda _m: None)


@torch.inference_mode()
def _reference_greedy(checkpoint) -> list[list[int]]:
    """transformers' float64 model of the dequantized weights with the dynamic activation
    quantization (fp8_checkpoints.float64_reference), greedy (its KV cache; generate() costs
    several times more in its per-token overheads)."""
    hf = float64_reference(checkpoint)
    out = []
    for p in prompts()[:PROMPTS]:
        step = hf(torch.tensor([tokenizer().encode(p).ids]), use_cache=True)
        tokens = [int(step.logits[0, -1].argmax())]
        while len(tokens) < NEW_TOKENS:
            step = hf(torch.tensor([tokens[-1:]]), past_key_values=step.past_key_values, use_cache=True)
            tokens.append(int(step.logits[0, -1].argmax()))
        out.append(tokens)
    return out


def _eager_greedy(model: Qwen3ForCausalLM) -> list[list[int]]:
    driver = FlatBatchDriver(model, model.config, model.dtype, "cpu")
    return driver.generate_greedy([tokenizer().encode(p).ids for p in prompts()[:PROMPTS]], NEW_TOKENS)


def test_block_fp8_artifact_greedy_equals_float64_model_of_the_quantized_checkpoint(fp8_artifact, block_fp8):
    with runtime.load(fp8_artifact) as engine:
        got = [c.token_ids for c in engine.generate(prompts()[:PROMPTS], GREEDY)]
    assert got == _reference_greedy(block_fp8)


def test_manifest_records_the_quantization_and_check_passes(fp8_artifact):
    q = json.loads((fp8_artifact / "manifest.json").read_text())["quantization"]
    assert q["method"] == "fp8" and q["block_size"] == [128, 128] and q["weight_dtype"] == "float8_e4m3fn"
    assert q["layers"] == sorted(f"layers.{i}.{p}" for i in range(4)
                                 for p in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    assert q["gemm"] == "triton"  # a CPU build: cuBLAS's GEMM is sm_90's
    assert any("FP8 weights (fp8, 16 layers, GEMM triton)" in line for line in manifest.check(fp8_artifact))


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.pop("quantization"), "says float weights"),
    (lambda m: m["quantization"]["layers"].pop(), "says FP8 layers"),
    (lambda m: m["quantization"].update(method="int4"), "quantization entry this qwen3-aot does not read"),
])
def test_check_and_load_refuse_a_quantization_the_weights_do_not_have(fp8_artifact, tmp_path, damage, message):
    art = tmp_path / "a"
    shutil.copytree(fp8_artifact, art)
    edit_manifest(art, damage)
    with pytest.raises(Qwen3AotError, match=message):
        manifest.check(art)
    with pytest.raises(Qwen3AotError, match=message):
        runtime.load(art)


def test_compressed_tensors_greedy_equals_float64_model_of_the_checkpoint_and_fused_parts_keep_their_scales(tmp_path):
    ckpt = write_compressed_tensors(tmp_path / "ct")
    model = Qwen3ForCausalLM.from_pretrained(ckpt, dtype="float32", device="cpu")
    assert model.quantization["method"] == "compressed-tensors" and model.quantization["source_strategy"] == "channel"
    stored = load_file(str(ckpt / "model.safetensors"))
    parts = [stored[f"model.layers.1.self_attn.{p}_proj.weight_scale"][:, 0] for p in "qkv"]
    assert torch.equal(model.layers[1].qkv_proj_scale[:, 0], torch.cat(parts))
    assert model.embed_tokens.dtype == torch.float32 and model.layers[1].qkv_proj.dtype == torch.float8_e4m3fn
    assert _eager_greedy(model) == _reference_greedy(ckpt)


def test_small_batch_form_is_as_close_to_float64_as_the_main_graph(block_fp8):
    """The small-batch graph's FP8 layers (weight-only kernels, norms unfused), run eagerly:
    no further from float64 of the dequantized weights than the main form (activations quantized)."""
    from qwen3_aot.build.reference import Float64Forward

    model = Qwen3ForCausalLM.from_pretrained(block_fp8, device="cpu")
    seqs = [tokenizer().encode(p).ids for p in prompts()[:3]]
    ref = torch.cat(FlatBatchDriver(Float64Forward(model), model.config, torch.float64, "cpu").logits(seqs))
    driver = FlatBatchDriver(model, model.config, model.dtype, "cpu")
    main = torch.cat(driver.logits(seqs))
    model.small_batch = True
    small = torch.cat(driver.logits(seqs))
    err = lambda x: float((x.double() - ref).norm() / ref.norm())  # noqa: E731
    assert err(small) <= 1.25 * err(main) + 1e-2 and err(main) < 0.1


def test_quantize_fp8_writes_the_block_fp8_checkpoints_weights(block_fp8, tmp_path):
    """--quantize fp8 of the bf16 weights is the block-FP8 checkpoint written by the format's rule."""
    _, built = load_checkpoint(write_bf16(tmp_path / "bf16"), quantize="fp8")
    _, read = load_checkpoint(block_fp8)
    assert built.keys() == read.keys()
    for name in built:
        assert built[name].dtype == read[name].dtype and torch.equal(built[name].float(), read[name].float()), name


def _drop_scale(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.layers.2.mlp.down_proj.weight_scale_inv"
    shard = path / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard))
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _edit_scale(path, fn):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.k_proj.weight_scale_inv"
    shard = path / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = fn(tensors[name])
    save_file(tensors, str(shard))


@pytest.mark.parametrize("config, damage, message", [
    ({}, lambda p: _edit_scale(p, lambda s: s * float("nan")), "non-finite or non-positive scales"),
    ({}, lambda p: _edit_scale(p, lambda s: torch.ones(3, 3)), r"k_proj.weight_scale_inv has shape \(3, 3\)"),
    ({}, _drop_scale, r"lacks 1 tensor.*down_proj.weight_scale_inv"),
    ({"weight_block_size": [64, 64]}, None, r"weight_block_size \[64, 64\] \(only \[128, 128\]"),
    ({"activation_scheme": "static"}, None, "activation_scheme 'static'"),
    ({"quant_method": "gptq"}, None, "quant_method is 'gptq'"),
])
def test_unsupported_or_damaged_fp8_checkpoints_are_refused_and_nothing_is_written(tmp_path, config, damage, message):
    ckpt = write_block_fp8(tmp_path / "ckpt", **config)
    if damage:
        damage(ckpt)
    out = tmp_path / "out"
    with pytest.raises(Qwen3AotError, match=message):
        export(ckpt, out, device="cpu", check=False, log=lambda _m: None)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_fp8_refuses_what_it_cannot_build(block_fp8, tmp_path):
    for kwargs, message in [({"formats": ("onnx",)}, "pt2 graph only"), ({"tensor_parallel": 2}, "tensor-parallel")]:
        with pytest.raises(Qwen3AotError, match=message):
            export(block_fp8, tmp_path / "out", device="cpu", log=lambda _m: None, **kwargs)
    with pytest.raises(Qwen3AotError, match="already quantized"):
        export(block_fp8, tmp_path / "out", device="cpu", quantize="fp8", log=lambda _m: None)
    with pytest.raises(Qwen3AotError, match="--quantize fp8 writes new weights"):
        export(write_bf16(tmp_path / "bf16"), tmp_path / "out", device="cpu", quantize="fp8", weights="link",
               log=lambda _m: None)
    assert not (tmp_path / "out").exists()


def test_a_linked_fp8_checkpoint_reads_as_the_copied_state(block_fp8, tmp_path):
    """--weights link of an FP8 checkpoint: the build accepts its FP8 tensors, and the runtime's
    load-time fusion (weight_reader) makes the state the build's loader makes, scales included."""
    from qwen3_aot.build.linked import linkable_files
    from qwen3_aot.quantization import CheckpointQuantization
    from qwen3_aot.runtime.forward.weight_reader import read_model_state
    from qwen3_aot.weights import checkpoint_quantization, tensor_files

    assert linkable_files(block_fp8, tmp_path, None) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    cfg, copied = load_checkpoint(block_fp8)
    source = checkpoint_quantization(block_fp8).source()
    linked = read_model_state(tensor_files(block_fp8), cfg, torch.bfloat16, torch.device("cpu"),
                              CheckpointQuantization.from_source(json.loads(json.dumps(source))))
    assert linked.keys() == copied.keys()
    assert all(linked[n].dtype == copied[n].dtype and torch.equal(linked[n].float(), copied[n].float()) for n in copied)


def test_an_fp8_artifact_is_refused_on_a_gpu_without_fp8(fp8_artifact, monkeypatch):
    """An A100 (8.0) has no FP8: the load says so rather than failing in a kernel (the GPU
    faked: CI has none; the check reads only what torch.cuda reports)."""
    man = json.loads((fp8_artifact / "manifest.json").read_text())
    man["device"], man["build_env"]["compute_capability"] = "cuda", "8.0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_a: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(Qwen3AotError, match=r"FP8 weights, which need a GPU of compute capability 8.9.*A100"):
        manifest.check_compiled(fp8_artifact, man)


class _RecordingOps:
    """Our ops, recording what each fp8_linear call is told (act_quant, block_scales)."""
    def __init__(self):
        self.fp8_calls = []

    def __getattr__(self, name):
        return getattr(OPS, name)

    def fp8_linear(self, x, w, w_scale, act_quant, block_scales=False):
        self.fp8_calls.append((act_quant, block_scales))
        return OPS.fp8_linear(x, w, w_scale, act_quant, block_scales)


@pytest.mark.parametrize("aligned", [True, False])
def test_the_graph_asks_for_the_block_scaled_gemm_where_every_projection_has_whole_blocks(tmp_path, block_fp8,
                                                                                           aligned):
    """Heads of 128 make every fused part whole 128-row blocks: each GEMM may be cuBLAS's. The
    fixture's k and v (64 rows each) share a block: its GEMMs must not be."""
    ckpt = write_random_checkpoint(tmp_path / "aligned", dtype=torch.bfloat16, hidden_size=128, intermediate_size=256,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=128) if aligned else block_fp8
    ops = _RecordingOps()
    model = Qwen3ForCausalLM.from_pretrained(ckpt, device="cpu", quantize="fp8" if aligned else None, ops=ops)
    driver = FlatBatchDriver(model, model.config, model.dtype, "cpu")
    driver.logits([[3, 5, 7], [11, 13]])
    layers = model.config.num_hidden_layers
    assert ops.fp8_calls == [(True, aligned)] * 4 * layers
    assert all(layer.block_scaled == (frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}) if aligned
                                      else frozenset()) for layer in model.layers)


@pytest.mark.parametrize("hidden, expected", [(512, "cublas"), (128, "triton"), (None, "triton")])
def test_the_manifest_names_cublas_gemm_only_where_the_op_would_take_it(tmp_path, block_fp8, hidden, expected,
                                                                         monkeypatch):
    """The manifest's `gemm` says what the build traced: cuBLAS's where the op's predicate takes
    it for some projection (on a pretended sm_90 with the opt-in set): inputs of 512 (hidden,
    4 heads of 128, intermediate) and scales by block do; block scales with inputs of 128 do
    not, nor the fixture's scales that straddle blocks (hidden None)."""
    ckpt = block_fp8 if hidden is None else write_random_checkpoint(
        tmp_path / "aligned", dtype=torch.bfloat16, hidden_size=hidden, intermediate_size=hidden,
        num_attention_heads=hidden // 128, num_key_value_heads=1, head_dim=128)
    model = Qwen3ForCausalLM.from_pretrained(ckpt, dtype="bfloat16", device="cpu",
                                             quantize=None if hidden is None else "fp8")
    monkeypatch.setenv("QWEN3_AOT_FP8_GEMM", "cublas")
    assert pipeline.fp8_gemm(model, "cpu") == "triton"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert pipeline.fp8_gemm(model, "cuda") == expected
