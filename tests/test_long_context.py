"""RoPE scaling (YaRN, linear) against transformers, float64 as the referee: the cos/sin table
at 131,072 positions, every YaRN field honoured or refused, logits and greedy tokens past
original_max_position_embeddings, and what an export records."""

import json
import shutil

import pytest
import torch

from random_checkpoints import write_random_checkpoint
from suite_support import FIXTURE, prompt_ids, rel_err
from qwen3_aot import Qwen3AotError
from qwen3_aot.config import Qwen3Config
from qwen3_aot.custom_ops.qkv_rope import rope_cos_sin
from qwen3_aot.driver import FlatBatchDriver
from qwen3_aot.model import Qwen3ForCausalLM, rope_table

pytestmark = pytest.mark.xdist_group("test_long_context")  # one worker writes the checkpoints

QWEN3_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}  # Qwen3's documented
# Qwen3-8B's config.json, as far as RoPE goes
QWEN3_8B = dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rms_norm_eps=1e-6, rope_theta=1e6)

# The other YaRN fields, each as transformers reads it (modeling_rope_utils._compute_yarn_parameters)
OTHER_FIELDS = {
    "betas": dict(beta_fast=16, beta_slow=2),
    "no truncate": dict(truncate=False),
    "mscale pair": dict(mscale=0.707, mscale_all_dim=1.0),
    "lone mscale (ignored by transformers too)": dict(mscale=2.0),
    "attention_factor": dict(attention_factor=1.3, mscale=2.0, mscale_all_dim=1.0),  # it wins over the pair
    "beta 0 and null are the defaults": dict(beta_fast=0, beta_slow=None),
    "factor null: max_position_embeddings / original": dict(factor=None, original_max_position_embeddings=10240),
    "original absent: max_position_embeddings": dict(original_max_position_embeddings=None),
}


def hf_rotary(hf_dict: dict, positions: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """transformers' own Qwen3 cos and sin [positions, head_dim] (fp32) and attention scaling."""
    from transformers import Qwen3Config as HFConfig
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    rotary = Qwen3RotaryEmbedding(HFConfig.from_dict(hf_dict))
    cos, sin = rotary(torch.zeros(1), torch.arange(positions)[None])
    return cos[0], sin[0], rotary.attention_scaling


def with_rope(hf: dict, rope: dict) -> dict:
    rope = {k: v for k, v in rope.items() if v is not None or k not in ("original_max_position_embeddings",)}
    return {**hf, "rope_parameters": {"rope_theta": hf["rope_theta"], **rope}}


def assert_table_is_transformers(hf: dict, positions: int) -> Qwen3Config:
    cfg = Qwen3Config.from_hf_dict(hf)
    ours = rope_cos_sin(cfg.head_dim, cfg.rope_theta, positions, scaling=cfg.rope_scaling)
    cos, sin, scaling = hf_rotary(hf, positions)
    half = cfg.head_dim // 2
    # bit for bit: the same fp32 operations in the same order (rotate-half: both halves equal)
    assert torch.equal(ours[:, :half], cos[:, :half]) and torch.equal(ours[:, half:], sin[:, :half])
    assert cfg.rope_scaling is None or cfg.rope_scaling.get("attention_factor", 1.0) == scaling
    return cfg


def test_qwen3_yarn_table_is_transformers_bit_for_bit_at_131072():
    cfg = assert_table_is_transformers(with_rope(QWEN3_8B, QWEN3_YARN), 131072)
    assert cfg.context_length == 131072
    assert cfg.rope_scaling["attention_factor"] == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    plain = rope_cos_sin(128, 1e6, 131072)
    assert not torch.equal(plain, rope_cos_sin(128, 1e6, 131072, scaling=cfg.rope_scaling))


@pytest.mark.parametrize("fields", OTHER_FIELDS.values(), ids=OTHER_FIELDS.keys())
def test_each_other_yarn_field_is_honoured_as_transformers_reads_it(fields):
    rope = {**QWEN3_YARN, **fields}
    cfg = assert_table_is_transformers(with_rope(QWEN3_8B, rope), 8192)
    if fields.get("factor", 1) is None:
        assert cfg.context_length == QWEN3_8B["max_position_embeddings"]


def test_linear_scaling_is_transformers_and_stretches_the_context():
    cfg = assert_table_is_transformers(with_rope(QWEN3_8B, {"rope_type": "linear", "factor": 2.0}), 8192)
    assert cfg.context_length == 2 * 40960


@pytest.mark.parametrize("rope, needle", [
    ({"rope_type": "dynamic", "factor": 2.0}, "dynamic NTK"),
    ({"rope_type": "longrope", "factor": 2.0}, "'longrope' is not supported"),
    ({**QWEN3_YARN, "low_freq_factor": 1.0}, "low_freq_factor"),
    ({**QWEN3_YARN, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({**QWEN3_YARN, "beta_fast": 1, "beta_slow": 32}, "beta_fast > beta_slow"),
    ({**QWEN3_YARN, "attention_factor": 0.0}, "attention_factor"),
    ({**QWEN3_YARN, "factor": 0.5}, "factor"),
    ({**QWEN3_YARN, "factor": "4"}, "factor"),
    ({**QWEN3_YARN, "mscale": "big"}, "mscale"),
    ({"rope_type": "yarn", "original_max_position_embeddings": 32768}, "needs a factor"),
    ({**QWEN3_YARN, "original_max_position_embeddings": 0}, "original_max_position_embeddings"),
])
def test_fields_we_cannot_honour_are_refused_by_name(rope, needle):
    with pytest.raises(Qwen3AotError, match=needle):
        Qwen3Config.from_hf_dict(with_rope(QWEN3_8B, rope))
    with pytest.raises(Qwen3AotError, match=needle):
        Qwen3Config.from_hf_dict(QWEN3_8B).with_rope_scaling(rope)


def test_rope_scaling_beside_rope_parameters_is_refused():
    """transformers 5 would read rope_scaling alone and lose rope_parameters' rope_theta."""
    hf = {**with_rope(QWEN3_8B, {"rope_type": "default"}), "rope_scaling": QWEN3_YARN}
    del hf["rope_theta"]
    with pytest.raises(Qwen3AotError, match="rope_parameters and rope_scaling"):
        Qwen3Config.from_hf_dict(hf)
    legacy = {**QWEN3_8B, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    assert Qwen3Config.from_hf_dict(legacy).rope_scaling == Qwen3Config.from_hf_dict(with_rope(QWEN3_8B,
                                                                                                QWEN3_YARN)).rope_scaling


# ---- the model past original_max_position_embeddings ----

# tiny dims, a small original context (128) and theta 1e4, so that 512 positions reach 4x past it
# and the ramp spans several of the 16 frequencies. (At 1,000 tokens fp32's own error, ours and
# transformers' alike, grows to the 1e-5 bound that today's parity tests hold at under 100.)
TINY_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 1e4}
YARN_CASES = {"qwen3's fields": {}, "other fields": dict(beta_fast=8, beta_slow=2, truncate=False, mscale=2.0,
                                                           mscale_all_dim=1.0)}


@pytest.fixture(scope="module", params=YARN_CASES.values(), ids=YARN_CASES.keys())
def yarn_ckpt(request, tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("yarn") / "ckpt", seed=3, k_norm_max=120.0,
                                   max_position_embeddings=512, rope_parameters={**TINY_YARN, **request.param})


@torch.inference_mode()
def test_yarn_logits_past_the_original_context_match_transformers_float64(yarn_ckpt, kernel_device):
    from transformers import Qwen3ForCausalLM as HF

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (512, 64)]
    model = Qwen3ForCausalLM.from_pretrained(yarn_ckpt, dtype="float32", device=kernel_device)
    assert model.config.context_length == 512 and model.config.rope_scaling["factor"] == 4.0
    ours = FlatBatchDriver.of(model).logits(seqs)
    exact = HF.from_pretrained(yarn_ckpt, dtype=torch.float64, attn_implementation="sdpa").eval()
    theirs = HF.from_pretrained(yarn_ckpt, dtype=torch.float32).eval()
    for o, s in zip(ours, seqs):
        ref = exact(torch.tensor([s])).logits[0]
        assert rel_err(o, ref) <= 1e-5
        if len(s) > 128:  # the positions past the original context alone
            assert rel_err(o[128:], ref[128:]) <= 1e-5
        assert rel_err(o, theirs(torch.tensor([s])).logits[0]) <= 1e-5  # today's parity test, at its bound
    # the test can tell: the same weights with plain RoPE are far off past the original context
    plain = Qwen3ForCausalLM.from_pretrained(yarn_ckpt, dtype="float32", device=kernel_device)
    plain.set_positions(512, plain.config.with_rope_scaling({"rope_type": "default"}))
    ref = exact(torch.tensor([seqs[0]])).logits[0]
    assert rel_err(FlatBatchDriver.of(plain).logits(seqs[:1])[0][128:], ref[128:]) > 1e-2


@pytest.fixture(scope="module")
def yarn_fixture(tmp_path_factory):
    """The trained fixture with YaRN over a 128-token original context: factor 4 to its 512."""
    path = tmp_path_factory.mktemp("yarn-fixture") / "tiny-qwen3-yarn"
    shutil.copytree(FIXTURE, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {**cfg["rope_parameters"], "rope_type": "yarn", "factor": 4.0,
                              "original_max_position_embeddings": 128}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@torch.inference_mode()
def test_yarn_greedy_continuation_is_transformers(yarn_fixture, kernel_device):
    from transformers import Qwen3ForCausalLM as HF

    seqs = prompt_ids([(0, 400), (20000, 600)])  # about 200 and 300 tokens: past 128
    assert min(map(len, seqs)) > 128
    model = Qwen3ForCausalLM.from_pretrained(yarn_fixture, dtype="float32", device=kernel_device)
    ours = FlatBatchDriver.of(model).generate_greedy(seqs, 32)
    ref = HF.from_pretrained(yarn_fixture, dtype=torch.float32).eval()
    for s, o in zip(seqs, ours):
        want = ref.generate(torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long),
                            max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(s):]
        assert o == want.tolist()


# ---- what an export takes and records ----

@pytest.fixture
def uncompiled(monkeypatch):
    """build.export with the AOTInductor compile left out (a CPU compile takes 15-60 s):
    what is tested here is what the build records and saves, not the compiled code."""
    import qwen3_aot.build.pipeline as pipeline

    monkeypatch.setattr(pipeline, "compile_package", lambda ep, path, device: path.write_bytes(b"") or {})
    return pipeline.export


@pytest.mark.parametrize("max_model_len", [0, 300])
def test_export_records_the_rope_scaling_and_a_table_of_max_model_len_rows(uncompiled, tmp_path, max_model_len):
    from safetensors.torch import load_file

    from qwen3_aot.build import GraphLimits

    out = uncompiled(FIXTURE, tmp_path / "art", device="cpu", dtype="float32", check=False,
                     limits=GraphLimits(max_model_len=max_model_len), log=lambda _m: None,
                     rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256})
    man = json.loads((out / "manifest.json").read_text())
    cfg = Qwen3Config.from_dict(man["model_config"])
    assert cfg.rope_scaling == Qwen3Config.from_checkpoint(FIXTURE).with_rope_scaling(
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}).rope_scaling
    assert cfg.rope_theta == 1e4 and cfg.context_length == 1024  # the checkpoint's theta; 256 x 4
    want_len = max_model_len or 1024  # past the fixture's own max_position_embeddings (512)
    assert man["limits"]["max_model_len"] == want_len
    table = load_file(out / "weights.safetensors")["cos_sin"]
    assert torch.equal(table, rope_table(cfg, want_len, "cpu"))


def test_a_max_model_len_past_the_context_says_how_to_stretch_it(uncompiled, tmp_path):
    from qwen3_aot.build import GraphLimits

    with pytest.raises(Qwen3AotError, match="exceeds the model's context of 512 tokens.*--rope-scaling"):
        uncompiled(FIXTURE, tmp_path / "art", device="cpu", check=False, limits=GraphLimits(max_model_len=600),
                   log=lambda _m: None)
    with pytest.raises(Qwen3AotError, match="dynamic NTK"):  # refused before any work
        uncompiled(FIXTURE, tmp_path / "art2", device="cpu", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert not (tmp_path / "art2").exists()


def test_the_export_command_takes_rope_scaling_json(tmp_path, capsys):
    from qwen3_aot.cli import build_parser, main

    a = build_parser().parse_args(["export", "ckpt", "-o", "art", "--rope-scaling", json.dumps(QWEN3_YARN),
                                   "--max-model-len", "131072"])
    assert json.loads(a.rope_scaling) == QWEN3_YARN and a.max_model_len == 131072
    assert main(["export", str(FIXTURE), "-o", str(tmp_path / "a"), "--rope-scaling", "{yarn"]) != 0
    assert "--rope-scaling is not valid JSON" in capsys.readouterr().err


def test_a_request_past_the_artifacts_context_says_how_to_rebuild():
    from qwen3_aot.runtime.core.request import request_limits

    (most, what), _ = request_limits(4096, 10**6)
    assert most == 4096 and "--max-model-len" in what and "--rope-scaling" in what
