"""export --tensor-parallel: a degree that does not split the heads is refused before any work,
and the shards put together are the model's weights, split as the manifest says."""

import pytest
import torch

from suite_support import FIXTURE
from qwen3_aot.build import export
from qwen3_aot.build.tensor_parallel import rank_model, shard_state
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.model import Qwen3ForCausalLM


@pytest.fixture(scope="module")
def model() -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM.from_pretrained(FIXTURE, dtype="float32", device="cpu")


@pytest.mark.parametrize("n", [3, 4])
def test_a_degree_that_does_not_divide_the_kv_heads_is_refused(tmp_path, n):
    with pytest.raises(Qwen3AotError, match=r"does not divide this model's num_key_value_heads \(2\).*Use one of "
                                            r"\[1, 2\]"):
        export(FIXTURE, tmp_path / "tp", device="cpu", tensor_parallel=n, log=lambda _m: None)
    assert not any(tmp_path.iterdir())


def test_tensor_parallel_needs_copied_pt2_weights(tmp_path):
    with pytest.raises(Qwen3AotError, match="--format pt2 and --weights copy"):
        export(FIXTURE, tmp_path / "tp", device="cpu", tensor_parallel=2, weights="link",
                        log=lambda _m: None)


def test_the_shards_put_together_are_the_model(model):
    cfg, n = model.config, 2
    shards = [shard_state(model, n, r) for r in range(n)]
    full = dict(model.named_parameters())
    cat = lambda name, dim=0: torch.cat([s[name] for s in shards], dim=dim)  # noqa: E731
    assert torch.equal(cat("embed_tokens"), full["embed_tokens"])
    assert [int(s["vocab_start"]) for s in shards] == [0, cfg.vocab_size // 2]
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        q, k, v = full[p + "qkv_proj"].split([cfg.q_size, cfg.kv_size, cfg.kv_size])
        parts = [s[p + "qkv_proj"].split([cfg.q_size // n, cfg.kv_size // n, cfg.kv_size // n]) for s in shards]
        for j, whole in enumerate((q, k, v)):  # each rank: whole q heads, then its KV heads, then their v
            assert torch.equal(torch.cat([part[j] for part in parts]), whole)
        gate, up = full[p + "gate_up_proj"].chunk(2)
        assert torch.equal(torch.cat([s[p + "gate_up_proj"].chunk(2)[0] for s in shards]), gate)
        assert torch.equal(torch.cat([s[p + "gate_up_proj"].chunk(2)[1] for s in shards]), up)
        assert torch.equal(cat(p + "o_proj", 1), full[p + "o_proj"])
        assert torch.equal(cat(p + "down_proj", 1), full[p + "down_proj"])
        assert all(torch.equal(s[p + "q_norm"], full[p + "q_norm"]) for s in shards)


def test_a_rank_model_sees_its_heads_and_its_vocabulary(model):
    rm = rank_model(model, 2, 1)
    assert (rm.config.num_attention_heads, rm.config.num_key_value_heads, rm.config.vocab_size,
            rm.config.intermediate_size) == (2, 1, 256, 96)
    assert int(rm.vocab_start) == 256 and rm.full_config == model.config
