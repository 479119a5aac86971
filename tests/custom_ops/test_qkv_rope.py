import pytest
import torch

from suite_support import rel_err
from qwen3_aot.custom_ops.qkv_rope import (qk_norm_rope_cache_reference, qk_norm_rope_cache_triton, qkv_rope_reference,
                                          qkv_rope_triton, rope_cos_sin)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
LAYOUTS = [(16, 8, 128, 1024), (4, 2, 32, 96), (2, 1, 64, 40)]  # (Hq, Hkv, D, H): Qwen3-0.6B, tiny, odd H


def _inputs(hq, hkv, d, h, t, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    w = torch.randn((hq + 2 * hkv) * d, h, generator=g) / h ** 0.5
    qn = (torch.randn(d, generator=g) * 2).abs()
    kn = (torch.randn(d, generator=g) * 9.1 + 3.6).abs()
    kn[5] = 96.5  # Qwen3-0.6B's layer-0 maximum: k reaches ~220
    pos = torch.randint(0, 4000, (t,), generator=g)
    pos[0] = 0
    cs = rope_cos_sin(d, 1e6, 4096)
    dev = lambda a: a.to(device)  # noqa: E731
    return (dev(x.to(dtype)), dev(w.to(dtype)), dev(qn.to(dtype)), dev(kn.to(dtype)), dev(cs), dev(pos))


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_qkv_rope_matches_float64(impl, layout, dtype, kernel_device, poison_new_tensors):
    hq, hkv, d, h = layout
    device = kernel_device if impl == "triton" else "cpu"
    args = _inputs(hq, hkv, d, h, 5, dtype, device, seed=hq * d + h)
    fn = qkv_rope_triton if impl == "triton" else qkv_rope_reference
    q, k, v = fn(*args, hq, hkv, 1e-6)
    assert q.shape == (5, hq, d) and k.shape == (5, hkv, d) and v.shape == (5, hkv, d)
    # The oracle starts from the projection rounded as the op rounds it (the matmul is torch's,
    # not ours): fed through an identity weight, only norm + RoPE are computed in float64.
    x, w, qn, kn, cs, pos = (a.cpu() for a in args)
    qkv = torch.nn.functional.linear(x, w).double()
    eye = torch.eye(qkv.shape[1], dtype=torch.float64)
    oq, ok, ov = qkv_rope_reference(qkv, eye, qn.double(), kn.double(), cs.double(), pos, hq, hkv, 1e-6)
    assert rel_err(q, oq) <= TOL[dtype]
    assert rel_err(k, ok) <= TOL[dtype]
    assert rel_err(v, ov) <= TOL[dtype]  # v is the projection, copied (exact on CPU; CUDA matmul rounds its own way)
    assert k.abs().max() > 100  # the extreme k_norm weight did act


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_qk_norm_rope_cache_writes_the_slots_of_the_table(impl, dtype, kernel_device, poison_new_tensors):
    """The small-batch epilogue: q as qkv_rope's; k and v at each token's slot of its block
    table (two sequences, one crossing a block boundary); every other slot left as it was."""
    hq, hkv, d, h, bs = 4, 2, 32, 96, 4
    device = kernel_device if impl == "triton" else "cpu"
    x, w, qn, kn, cs, _ = _inputs(hq, hkv, d, h, 5, dtype, device, seed=21)
    qkv = torch.nn.functional.linear(x, w)
    positions = torch.tensor([2, 3, 4, 5, 0], device=device)  # sequence 0 decodes 4 tokens, sequence 1 starts
    seq_ids = torch.tensor([0, 0, 0, 0, 1], dtype=torch.int32, device=device)
    tables = torch.tensor([[3, 0], [5, 1]], dtype=torch.int32, device=device)
    g = torch.Generator().manual_seed(3)
    k_cache, v_cache = (torch.randn(6, bs, hkv, d, generator=g).to(dtype).to(device) for _ in range(2))
    k_before, v_before = k_cache.clone(), v_cache.clone()
    fn = qk_norm_rope_cache_triton if impl == "triton" else qk_norm_rope_cache_reference
    q = fn(qkv, qn, kn, cs, positions, seq_ids, tables, k_cache, v_cache, hq, hkv, 1e-6)

    eye = torch.eye(qkv.shape[1], dtype=torch.float64)
    oq, ok, ov = qkv_rope_reference(qkv.cpu().double(), eye, qn.cpu().double(), kn.cpu().double(), cs.cpu().double(),
                                    positions.cpu(), hq, hkv, 1e-6)
    assert rel_err(q, oq) <= TOL[dtype]
    slots = [(3, 2), (3, 3), (0, 0), (0, 1), (5, 0)]  # (block, offset) of each token
    for t, (blk, off) in enumerate(slots):
        assert rel_err(k_cache[blk, off], ok[t]) <= TOL[dtype]
        assert rel_err(v_cache[blk, off], ov[t]) <= TOL[dtype]
        k_cache[blk, off], v_cache[blk, off] = k_before[blk, off], v_before[blk, off]
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


def test_rope_table_matches_transformers():
    """fp32 runs equal transformers bit for bit only if cos/sin are computed the same way."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    cfg = Qwen3Config(head_dim=128, hidden_size=1024, num_attention_heads=16, rope_theta=1e6)
    rot = Qwen3RotaryEmbedding(cfg)
    pos = torch.arange(3000)[None]
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    table = rope_cos_sin(128, 1e6, 3000)
    assert torch.equal(table[:, :64], cos[0, :, :64]) and torch.equal(table[:, 64:], sin[0, :, :64])


def test_qkv_rope_registered_op_on_cpu_is_reference():
    args = _inputs(4, 2, 32, 96, 3, torch.bfloat16, "cpu", seed=11)
    got = torch.ops.qwen3_aot.qkv_rope(*args, 4, 2, 1e-6)
    want = qkv_rope_reference(*args, 4, 2, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
