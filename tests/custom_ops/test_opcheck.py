"""torch.library.opcheck: schema, fake (meta) kernels against the real ones (shapes, strides,
dtypes), and dynamic-shape tracing, for every op on CPU. A fake that disagrees with its kernel
breaks torch.compile and export silently or late (seen: v returned as a strided view)."""

import pytest
import torch

import qwen3_aot.custom_ops  # noqa: F401
from qwen3_aot.custom_ops.qkv_rope import rope_cos_sin


def _qkv_args(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g).to(dtype)
    w = (torch.randn(8 * 32, 64, generator=g) / 8).to(dtype)
    return (x, w, torch.rand(32).to(dtype), (torch.rand(32) * 96.5).to(dtype), rope_cos_sin(32, 1e6, 64),
            torch.tensor([0, 1, 2, 9, 40]), 4, 2, 1e-6)


def _attention_args(dtype):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, h, 32, generator=g).to(dtype) for h in (4, 2, 2))
    caches = [torch.randn(4, 16, 2, 32, generator=g).to(dtype) for _ in range(2)]
    return (q, k, v, *caches, torch.tensor([0, 1, 17]), torch.tensor([0, 0, 1], dtype=torch.int32),
            torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), 32 ** -0.5)


CASES = {
    "rms_norm": lambda dt: (torch.randn(3, 48).to(dt), torch.randn(48).to(dt), 1e-6),
    "add_rms_norm": lambda dt: (torch.randn(3, 48).to(dt), torch.randn(3, 48).to(dt), torch.randn(48).to(dt), 1e-6),
    "qkv_rope": _qkv_args,
    "qk_norm_rope_cache": lambda dt: (torch.randn(3, 8 * 32).to(dt), *_qkv_args(dt)[2:4], rope_cos_sin(32, 1e6, 64),
                                      *_attention_args(dt)[5:8], *_attention_args(dt)[3:5], 4, 2, 1e-6),
    "small_linear": lambda dt: (torch.randn(3, 48).to(dt), torch.randn(20, 48).to(dt)),
    "rms_norm_linear": lambda dt: (torch.randn(3, 48).to(dt), torch.randn(48).to(dt), torch.randn(20, 48).to(dt),
                                   1e-6, True),
    "add_rms_norm_linear": lambda dt: (torch.randn(3, 48).to(dt), torch.randn(3, 48).to(dt), torch.randn(48).to(dt),
                                       torch.randn(20, 48).to(dt), 1e-6, False),
    "qk_norm_rope": lambda dt: (torch.randn(5, 8 * 32).to(dt), *_qkv_args(dt)[2:]),
    "fp8_linear": lambda dt: (torch.randn(3, 200).to(dt), torch.randn(20, 200).to(torch.float8_e4m3fn),
                              torch.rand(20, 2) / 100, True),
    "paged_attention": _attention_args,
    "paged_attention_cached": lambda dt: (_attention_args(dt)[0], *_attention_args(dt)[3:]),
}

# test_schema looks for mutated inputs with torch.allclose, which CPU torch lacks for FP8 tensors
SCHEMA_UNCHECKABLE = {"fp8_linear": ()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_opcheck(name, dtype):
    op = getattr(torch.ops.qwen3_aot, name).default
    # on CPU the ops stay opaque in traced graphs, as the CPU build compiles them
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(op, CASES[name](dtype), test_utils=SCHEMA_UNCHECKABLE.get(name, ("test_schema",))
                              + ("test_faketensor", "test_aot_dispatch_dynamic"))
