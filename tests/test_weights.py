"""Bad checkpoints raise Qwen3AotError with a message that names the problem."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from random_checkpoints import write_random_checkpoint
from qwen3_aot import Qwen3AotError
from qwen3_aot.config import Qwen3Config
from qwen3_aot.weights import load_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "good", num_hidden_layers=2)


@pytest.fixture
def ckpt(good, tmp_path):
    return shutil.copytree(good, tmp_path / "c")


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_good_checkpoint_loads_in_each_dtype(ckpt):
    for dtype in ("bfloat16", "float16", "float32"):
        cfg, state = load_checkpoint(ckpt, dtype)
        assert state["layers.0.qkv_proj"].shape == (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size)
        assert all(t.dtype == getattr(torch, dtype) for t in state.values())
    assert "lm_head" not in state  # tied: stored once


@pytest.mark.parametrize("change, needle", [
    (lambda p: shutil.rmtree(p), "does not exist"),
    (lambda p: (p / "config.json").unlink(), "no config.json"),
    (lambda p: (p / "config.json").write_text("{nope"), "not valid JSON"),
    (lambda p: _edit_config(p, model_type="llama", architectures=["LlamaForCausalLM"]), "'llama'"),
    (lambda p: _edit_config(p, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6}), "yarn"),
    (lambda p: _edit_config(p, head_dim=48), "power of two"),
    (lambda p: _edit_tensors(p, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight")),
     "model.layers.1.self_attn.k_norm.weight"),
    (lambda p: _edit_tensors(p, lambda t: t.update(extra=torch.zeros(2))), "'extra'"),
    (lambda p: _edit_tensors(p, lambda t: t.update({"model.norm.weight": torch.zeros(7)})), "model.norm.weight"),
    (lambda p: _edit_tensors(p, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)})),
     "int32"),
])
def test_bad_checkpoint_raises_our_error(ckpt, change, needle):
    change(ckpt)
    with pytest.raises(Qwen3AotError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        load_checkpoint(ckpt)


def test_pickle_only_checkpoint_is_refused_unread(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")  # never unpickled: contents irrelevant
    with pytest.raises(Qwen3AotError, match="pickle"):
        load_checkpoint(ckpt)


def test_sharded_checkpoint_with_untied_head(tmp_path):
    from transformers import Qwen3ForCausalLM

    path = write_random_checkpoint(tmp_path / "untied", tie=False, num_hidden_layers=2)
    hf = Qwen3ForCausalLM.from_pretrained(path)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    cfg, state = load_checkpoint(tmp_path / "sharded", "float32")
    assert torch.equal(state["lm_head"], hf.lm_head.weight)
    q = hf.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(state["layers.1.qkv_proj"][: q.shape[0]], q)


def test_missing_shard_is_named(tmp_path):
    from transformers import Qwen3ForCausalLM

    path = write_random_checkpoint(tmp_path / "c", num_hidden_layers=2)
    Qwen3ForCausalLM.from_pretrained(path).save_pretrained(tmp_path / "s", max_shard_size="100KB")
    shard = sorted((tmp_path / "s").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(Qwen3AotError, match=shard.name):
        load_checkpoint(tmp_path / "s")


def test_config_roundtrip(good):
    cfg = Qwen3Config.from_checkpoint(good)
    assert Qwen3Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.rope_theta == 1e6 and cfg.head_dim == 32 and cfg.tie_word_embeddings


def _truncate(f, keep: float) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage", [
    lambda f: _truncate(f, 0.5),                    # the header promises more bytes than the file has
    lambda f: _truncate(f, 0.0005),                 # not even the whole header
    lambda f: f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"),
], ids=["truncated", "header cut", "garbage header"])
def test_damaged_safetensors_is_named_in_our_error(ckpt, damage):
    damage(ckpt / "model.safetensors")
    with pytest.raises(Qwen3AotError, match="model.safetensors"):
        load_checkpoint(ckpt)
