"""The compiled forward of an artifact: model.pt2 loaded, weights handed over once."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from qwen3_aot.errors import Qwen3AotError


class CompiledForward:
    """Calls the AOTInductor package with the model's flat-batch inputs (see
    `qwen3_aot.model.Qwen3ForCausalLM.forward`); returns fp32 logits [N, vocab].

    The loader is constructed directly: `torch._inductor.aoti_load_package` first probes
    the host compiler to compare CPU ISAs (`get_device_information`: 10 s on a CPU
    machine, 53 s on the GPU machine), which `runtime` replaces with its manifest checks.
    """

    def __init__(self, artifact: Path, manifest: dict, device: torch.device, run_single_threaded: bool) -> None:
        if device.type == "cpu":
            import qwen3_aot.custom_ops  # noqa: F401  (CPU packages call our ops' registered kernels)
        graph = manifest["graphs"]["forward"]
        self.num_layers = manifest["model_config"]["num_hidden_layers"]
        index = device.index if device.index is not None else -1
        self._loader = torch._C._aoti.AOTIModelPackageLoader(
            str(artifact / graph["file"]), "model", run_single_threaded, 1, index)
        weights = load_file(str(artifact / manifest["weights"]), device=str(device))
        fqns = self._loader.get_constant_fqns()
        missing = sorted(set(fqns) - set(weights))
        if missing:
            raise Qwen3AotError(f"{artifact}: {manifest['weights']} lacks constants the graph needs, e.g. "
                                f"{missing[:3]}; rebuild the artifact.")
        # user_managed: the graph uses our tensors in place, so the weights exist once in memory
        self._loader.load_constants({k: weights[k] for k in fqns}, False, True, True)
        self._weights = weights  # the loader holds raw pointers: keep the tensors alive

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
                 block_tables: torch.Tensor, logits_indices: torch.Tensor,
                 k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        return self._loader.boxed_run([input_ids, positions, seq_ids, block_tables, logits_indices,
                                       *k_caches, *v_caches])[0]
