"""The compiled forward of an artifact: model.pt2 loaded, weights handed over once (read from
weights.safetensors, or from a linked artifact's checkpoint files and fused on the device)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from qwen3_aot.config import Qwen3Config
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.quantization import CheckpointQuantization
from qwen3_aot.runtime.forward.flat_batch import FlatBatch
from qwen3_aot.runtime.forward.extraction import remove_stale_extractions
from qwen3_aot.runtime.forward.weight_reader import read_file, read_model_state
from qwen3_aot.weights import CHECKPOINT_LAYOUT, DTYPES, name_rule, tensor_files

# AOTIModelPackageLoader(path, model_name, run_single_threaded, num_runners, device_index): its
# pybind constructor has no argument names (torch 2.11 and 2.13), so they are passed by position
MODEL_NAME = "model"   # the name aoti_compile_and_package gives the one model of a package
NUM_RUNNERS = 1        # one runner: the engine calls the graph from one thread
# load_constants(constants_map, use_inactive, check_full_update, user_managed), same order in both
USE_INACTIVE = False       # fill the active constant buffer (no double-buffered weight swap)
CHECK_FULL_UPDATE = True   # every constant the graph needs must be given
USER_MANAGED = True        # the graph uses our tensors in place: the weights exist once in memory

SMALL_BATCH_GRAPH = "decode_small"  # the manifest's name for the small-batch graph (build/pipeline.py)

log = logging.getLogger("qwen3_aot")


class CompiledForward:
    """Calls the AOTInductor package with the model's flat-batch inputs (see
    `qwen3_aot.model.Qwen3ForCausalLM.forward`); returns fp32 logits [N, vocab].

    Implements runtime.forward.flat_batch.Forward; called with the graph's positional inputs
    it runs as the eager model does (drivers, the build's verify).

    The loader is constructed directly: `torch._inductor.aoti_load_package` first probes
    the host compiler to compare CPU ISAs (`get_device_information`, tens of seconds), which
    `runtime` replaces with its manifest checks.

    The loader unpacks the package into `$TMPDIR/aotinductor_XXXXXX` (std::filesystem's
    temp_directory_path + mkdtemp, seen in torch 2.13; 2.11 leaves the same names behind)
    and removes it in its destructor, which a killed process never runs. Its constructor
    takes only a package path, always unpacks afresh and cannot be pointed at an unpacked
    directory, so there is no extraction to reuse: each load instead removes the stale
    extractions of processes that are gone (`remove_stale_extractions`).
    """

    def __init__(self, artifact: Path, manifest: dict, device: torch.device, run_single_threaded: bool) -> None:
        if device.type == "cpu":
            import qwen3_aot.custom_ops  # noqa: F401  (CPU packages call our ops' registered kernels)
        entry = manifest.get("weights")
        if not (isinstance(entry, str) or isinstance(entry, dict) and entry.get("layout") == CHECKPOINT_LAYOUT):
            raise Qwen3AotError(f"{artifact}/manifest.json names no weights file for its pt2 graph; rebuild it.")
        self.num_layers = manifest["model_config"]["num_hidden_layers"]
        started = time.perf_counter()
        remove_stale_extractions()
        small = manifest["graphs"].get(SMALL_BATCH_GRAPH)
        packages = [artifact / manifest["graphs"]["forward"]["file"]] + ([artifact / small["file"]] if small else [])
        loaders = [_load_package(p, device, run_single_threaded) for p in packages]
        unpacked = time.perf_counter()
        weights = _read_file(artifact, entry, device) if isinstance(entry, str) else \
            _read_linked(artifact, entry, manifest, device)
        for loader in loaders:  # every graph uses the one copy of the weights
            fqns = loader.get_constant_fqns()
            missing = sorted(set(fqns) - set(weights))
            if missing:
                raise Qwen3AotError(f"{artifact}: its weights lack constants the graph needs, e.g. "
                                    f"{missing[:3]}; rebuild the artifact.")
            loader.load_constants({k: weights[k] for k in fqns}, USE_INACTIVE, CHECK_FULL_UPDATE, USER_MANAGED)
        self._main = PackageGraph(loaders[0])
        # the small-batch form of the forward (model.small_batch_layers), same inputs and result,
        # fewer kernels: for decode batches up to small_batch_max (DecodeGraphs picks per batch)
        self.small_batch_graph = PackageGraph(loaders[1]) if small else None
        self.small_batch_max = int(small.get("max_batch", 0)) if small else 0
        # kernels built to wait for their inputs, whose launch may overlap the kernel ahead
        # (runtime/forward/dependent_launch.py); none in an artifact built before they existed
        self.dependent_kernels = tuple(manifest.get("dependent_kernels", ()))
        self.weights = weights  # the graph constants by name; the loader holds raw pointers: keep them alive
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        # where start-up goes (bench/family_bench.py reports it): the package's unpacking and loading, the weights
        self.load_seconds = {"package": unpacked - started, "weights": time.perf_counter() - unpacked}
        log.info("%s: %d package(s) loaded in %.2f s, %.2f GB of weights read in %.2f s", artifact.name,
                 len(loaders), self.load_seconds["package"], sum(w.nbytes for w in weights.values()) / 1e9,
                 self.load_seconds["weights"])

    def run(self, batch: FlatBatch, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        return self._main.run(batch, k_caches, v_caches)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights this forward holds on its device: what a decode step reads at least."""
        return sum(w.nbytes for w in self.weights.values())

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
                 block_tables: torch.Tensor, logit_rows: torch.Tensor,
                 k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        return self._main(input_ids, positions, seq_ids, block_tables, logit_rows, k_caches, v_caches)


class PackageGraph:
    """One loaded package of the forward (model.pt2, or model_small.pt2): `run` on a FlatBatch,
    or called with the graph's positional inputs."""

    def __init__(self, loader: object) -> None:
        self._loader = loader

    def run(self, batch: FlatBatch, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        return self._loader.boxed_run([*batch.inputs(), *k_caches, *v_caches])[0]

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor,
                 block_tables: torch.Tensor, logit_rows: torch.Tensor,
                 k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> torch.Tensor:
        return self.run(FlatBatch(input_ids, positions, seq_ids, block_tables, logit_rows), k_caches, v_caches)


def _load_package(package: Path, device: torch.device, run_single_threaded: bool) -> object:
    index = device.index if device.index is not None else -1
    try:
        return torch._C._aoti.AOTIModelPackageLoader(str(package), MODEL_NAME, run_single_threaded, NUM_RUNNERS, index)
    except RuntimeError as e:
        raise Qwen3AotError(f"{package} could not be loaded as an AOTInductor package "
                            f"({str(e).splitlines()[0][:200]}); it is damaged or not one: rebuild the "
                            "artifact.") from e


def _read_file(artifact: Path, name: str, device: torch.device) -> dict[str, torch.Tensor]:
    """A safetensors file of graph constants under their own names, read onto `device`."""
    path = artifact / name
    if not path.is_file():
        raise Qwen3AotError(f"{path} is missing; rebuild or re-copy the artifact.")
    return read_file(path, device)


def _read_linked(artifact: Path, entry: dict, manifest: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """A linked artifact's constants (build/linked.py): the checkpoint's tensors read onto the
    device and fused there by this qwen3-aot's naming rule, which must be the one the build
    recorded, and the computed buffers."""
    files, buffers = entry.get("files"), entry.get("buffers")
    if not (isinstance(files, list) and all(isinstance(f, str) for f in files) and isinstance(buffers, str)):
        raise Qwen3AotError(f"{artifact}/manifest.json has a damaged weights entry; rebuild the artifact.")
    if entry.get("names") != name_rule():
        raise Qwen3AotError(f"{artifact} names its weights by another rule than this qwen3-aot's (built by another "
                            "version); rebuild the artifact with this one.")
    cfg = Qwen3Config.from_dict(manifest["model_config"])
    quant = entry.get("checkpoint_quantization")
    state = read_model_state(tensor_files(artifact, files), cfg, DTYPES[manifest["dtype"]], device,
                             CheckpointQuantization.from_source(quant) if quant else None)
    return {**state, **_read_file(artifact, buffers, device)}
