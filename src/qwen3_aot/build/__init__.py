"""The export pipeline: checkpoint -> torch.export -> AOTInductor package + weights + manifest."""

from qwen3_aot.build.graph import GraphLimits
from qwen3_aot.build.pipeline import export

__all__ = ["GraphLimits", "export"]
