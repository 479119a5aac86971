"""quantization.py's reading of checkpoint configs and scales, on the cases the fixture
checkpoints (tests/fp8_checkpoints.py) do not write: per-tensor and block compressed-tensors
scales, ignored layers, and what is refused."""

import pytest
import torch

from fp8_checkpoints import COMPRESSED_TENSORS_CONFIG
from qwen3_aot import Qwen3AotError
from qwen3_aot.quantization import parse, row_scales, rows_repeat_by_block


def _compressed(strategy: str, **weights) -> dict:
    group = COMPRESSED_TENSORS_CONFIG["config_groups"]["group_0"]
    return {"quantization_config": {**COMPRESSED_TENSORS_CONFIG, "ignore": ["lm_head", "re:.*layers\\.0\\.mlp\\..*"],
                                    "config_groups": {"g": {**group, "weights": {**group["weights"],
                                                                                 "strategy": strategy, **weights}}}}}


def test_per_tensor_and_block_scales_become_one_scale_per_row_and_group():
    tensor = parse(_compressed("tensor"), "c")
    assert torch.equal(row_scales((3, 200), torch.tensor([0.5]), tensor, "s"), torch.full((3, 2), 0.5))
    block = parse(_compressed("block", block_structure=[128, 128]), "c")
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    rows = row_scales((130, 200), s, block, "s")
    assert rows.shape == (130, 2) and torch.equal(rows[127], s[0]) and torch.equal(rows[128], s[1])


def test_ignored_layers_by_name_and_by_pattern():
    q = parse(_compressed("channel"), "c")
    assert q.quantized("model.layers.1.mlp.down_proj") and q.quantized("model.layers.0.self_attn.q_proj")
    assert not q.quantized("model.layers.0.mlp.down_proj") and not q.quantized("lm_head")
    assert not q.quantized("model.embed_tokens")


@pytest.mark.parametrize("config, message", [
    (_compressed("group", group_size=128), "weight strategy 'group'"),
    (_compressed("channel", num_bits=4, type="int"), "only 8-bit float"),
    ({"quantization_config": {**COMPRESSED_TENSORS_CONFIG, "format": "pack-quantized"}}, "format 'pack-quantized'"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}}, "fmt 'e5m2'"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quant_method is 'awq'"),
])
def test_other_quantizations_are_refused_by_name(config, message):
    with pytest.raises(Qwen3AotError, match=message):
        parse(config, "config.json")


def test_scales_repeat_by_block_only_where_every_128_rows_share_theirs():
    """What lets cuBLAS's 128x128 block-scaled GEMM read a fused projection: parts of whole blocks
    (q of 128 rows, then k of 128) do; a part of 64 rows makes a block of two parts' scales
    (the fixture's k and v); per-channel scales and row counts off 128 do not."""
    block = parse({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                           "weight_block_size": [128, 128]}}, "c")
    part = lambda rows, seed: row_scales((rows, 600), torch.rand(-(-rows // 128), 5,  # noqa: E731
                                                                  generator=torch.Generator().manual_seed(seed)) + 0.1,
                                         block, "s")
    assert rows_repeat_by_block(torch.cat([part(256, 0), part(128, 1)]))
    assert not rows_repeat_by_block(torch.cat([part(128, 0), part(64, 1), part(64, 2)]))
    assert not rows_repeat_by_block(part(192, 0))
    channel = parse(_compressed("channel"), "c")
    assert not rows_repeat_by_block(row_scales((256, 600), torch.rand(256, 1) + 0.1, channel, "s"))
    assert rows_repeat_by_block(row_scales((256, 600), torch.full((256, 1), 0.5), channel, "s"))
