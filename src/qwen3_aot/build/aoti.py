"""AOTInductor: compile the exported forward into model.pt2, weights kept outside."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator

import torch

from qwen3_aot.build.toolchain import pick_cxx


@contextlib.contextmanager
def leafspec_deprecation_ignored() -> Iterator[None]:
    """Torch's own deprecation, not ours, kept out of the export's output: Inductor's debug
    wrapper deep-copies the FX graph, whose pytree specs hold LeafSpecs, and copying one calls
    LeafSpec's deprecated constructor (torch 2.13: a FutureWarning from copyreg.py in every
    export). Every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        yield


def compile_package(ep: torch.export.ExportedProgram, path: Path, device: str) -> dict:
    """Compile `ep` into the package at `path`; returns the build options used.

    Weights are not put in the .so (package_constants_in_so=False): the artifact stores
    them once in weights.safetensors and the runtime hands them over with load_constants,
    so a 16 GB model works (the .so limit is 2 GB) and same-shape weights swap without a
    rebuild. Float scalars (eps, softmax scale) are tl.constexpr in our kernels: AOTI's
    compile-time kernel runs typed them fp64, which broke the kernels' loop-carried types. On CPU our Triton ops stay opaque calls to their registered CPU kernels
    (decomposing them would need a GPU driver).
    """
    options = {"aot_inductor.package_constants_in_so": False, "cpp.cxx": (None, pick_cxx()),
               # AOTI runs each Triton kernel once while compiling; on random inputs the cache
               # write would scatter through random block tables, out of bounds
               "triton.autotune_with_sample_inputs": True}
    opaque = torch._functorch.config.patch(decompose_custom_triton_ops=False) if device == "cpu" \
        else contextlib.nullcontext()
    with opaque, torch.no_grad(), leafspec_deprecation_ignored():
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=options)
    return {"inductor_configs": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
            "custom_ops": "triton (compiled in)" if device == "cuda" else "opaque (CPU reference kernels)"}
