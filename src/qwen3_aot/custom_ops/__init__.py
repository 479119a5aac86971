"""Our torch.library ops (namespace ``qwen3_aot``): importing this registers them all.

Each op file holds the Triton kernel (CUDA, and CPU under TRITON_INTERPRET=1),
the plain-torch reference (what CPU dispatch runs, and the tests' oracle in
float64), the fake implementation used by torch.export, and the math.
"""

from qwen3_aot.custom_ops.paged_attention import paged_attention
from qwen3_aot.custom_ops.qkv_rope import qkv_rope, rope_cos_sin
from qwen3_aot.custom_ops.rms_norm import add_rms_norm, rms_norm

__all__ = ["add_rms_norm", "paged_attention", "qkv_rope", "rms_norm", "rope_cos_sin"]
