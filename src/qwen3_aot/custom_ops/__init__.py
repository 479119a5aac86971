"""Our torch.library ops (namespace ``qwen3_aot``): importing this registers them all.

Call them as ``torch.ops.qwen3_aot.<name>``. Each op file holds the Triton kernel (CUDA,
and CPU under TRITON_INTERPRET=1), the plain-torch reference (what CPU dispatch runs, and
the tests' oracle in float64), the fake implementation used by torch.export, and the math.
"""

from qwen3_aot.custom_ops import (fp8_linear, paged_attention, qk_norm_rope, qkv_rope, rms_norm,  # noqa: F401
                                 small_linear)  # (registration)
