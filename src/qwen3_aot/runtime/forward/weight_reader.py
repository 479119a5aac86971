"""Safetensors read straight into the tensors the graph uses, on the CPU or a GPU.

A pool of threads reads the tensors' bytes with os.preadv, which releases the GIL, so that
several cores copy from the page cache at once. On a GPU each thread reads into its own two
pinned buffers in turn and copies each to the device on its own stream while it reads the
next: no pageable staging copy, reads overlapping transfers. A tensor made of several stored
ones (q/k/v and gate/up, weights.LAYER_NAMES) is allocated whole and each part written into
its slice of it: no torch.cat, no second copy on the host or the device.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from pathlib import Path

import numpy as np
import torch

from qwen3_aot.config import Qwen3Config
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.manifest import safetensors_layout
from qwen3_aot.quantization import SCALE_SUFFIX, CheckpointQuantization, row_scales, scale_names
from qwen3_aot.weights import STORED_DTYPES as WEIGHT_DTYPES, hf_shapes, model_state_names

READ_THREADS = 8         # page-cache reads scale to about this many cores
CHUNK_BYTES = 16 << 20   # one read and one copy; each thread pins two buffers of this size
# the weights' dtypes and those of the graph's other constants (a TP rank's vocabulary offset)
STORED_DTYPES = {**WEIGHT_DTYPES, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}


@dataclasses.dataclass(frozen=True)
class Stored:
    """A tensor as a safetensors file holds it: where its bytes are, its dtype and shape."""
    file: Path
    name: str
    start: int   # byte offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def stored_tensors(files: list[Path]) -> dict[str, Stored]:
    """Every tensor of the files, as their headers place them (each header checked to cover
    its file exactly, so every tensor's bytes are inside it)."""
    out: dict[str, Stored] = {}
    for f in files:
        data_start, header = safetensors_layout(f)
        for name, t in header.items():
            if name == "__metadata__":
                continue
            if t.get("dtype") not in STORED_DTYPES:
                raise Qwen3AotError(f"{f}: tensor {name} is stored as {t.get('dtype')}, which qwen3-aot does not "
                                    f"read (it reads {sorted(STORED_DTYPES)}).")
            begin, end = t["data_offsets"]
            out[name] = Stored(f, name, data_start + begin, end - begin, STORED_DTYPES[t["dtype"]], tuple(t["shape"]))
    return out


def read_model_state(files: dict[str, Path], cfg: Qwen3Config, dtype: torch.dtype, device: torch.device,
                     quant: CheckpointQuantization | None = None) -> dict[str, torch.Tensor]:
    """Our state from checkpoint-named safetensors (`files`: tensor name -> file, as
    weights.tensor_files gives), fused on the device as weights.model_state_names says. The
    bytes are used as stored: every tensor must already be `dtype` (no conversion), but for
    the FP8 weights of a quantized checkpoint (`quant`), whose scales become ours
    (quantization.row_scales) on the device."""
    expected: dict[str, tuple[int, ...]] = dict(hf_shapes(cfg))
    fp8 = scale_names(quant, list(expected)) if quant else {}
    missing = sorted(set(expected) - set(files)) + sorted(set(fp8.values()) - set(files))
    if missing:
        raise Qwen3AotError(f"the weight files lack {len(missing)} tensor(s) the config needs, e.g. {missing[:3]}.")
    stored = stored_tensors(sorted({files[n] for n in [*expected, *fp8.values()]}))
    for name in [*expected, *fp8.values()]:
        s = stored.get(name)
        if s is None or s.file != files[name]:
            raise Qwen3AotError(f"{files[name]} does not hold tensor {name}, which its index places there; "
                                "download or copy the checkpoint again.")
        shape = expected.get(name)
        if shape is None:  # a scale: row_scales checks it
            continue
        if s.shape != shape:
            raise Qwen3AotError(f"{s.file.name}: tensor {name} has shape {s.shape}, the config says {shape}.")
        want = torch.float8_e4m3fn if name in fp8 else dtype
        if s.dtype != want:
            raise Qwen3AotError(f"{s.file}: tensor {name} is {s.dtype}, the artifact runs {want}; the file was "
                                "replaced: rebuild the artifact.")
    names = dict(model_state_names(cfg))
    state = read_tensors({ours: [stored[n] for n in parts] for ours, parts in names.items()}, device)
    for ours, parts in names.items():
        if parts[0] in fp8:  # each part's scales as ours, concatenated as the weights are
            raw = read_tensors({fp8[p]: [stored[fp8[p]]] for p in parts}, device)
            state[ours + SCALE_SUFFIX] = torch.cat([row_scales(expected[p], raw[fp8[p]], quant, fp8[p]) for p in parts])
    return state


def read_file(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file under its own name."""
    return read_tensors({name: [s] for name, s in stored_tensors([path]).items()}, device)


def read_tensors(layout: dict[str, list[Stored]], device: torch.device) -> dict[str, torch.Tensor]:
    """One tensor per entry of `layout`, made of its stored parts concatenated along dim 0
    (parts of one dtype whose shapes agree but in dim 0)."""
    out, jobs, fds = {}, queue.SimpleQueue(), {}
    try:
        for f in {p.file for parts in layout.values() for p in parts}:
            fds[f] = os.open(f, os.O_RDONLY)
        _queue_reads(layout, out, jobs, fds, device)
        _run_reads(jobs, device)
    except OSError as e:
        raise Qwen3AotError(f"{e.filename or 'a weight file'} could not be read ({e.strerror or e}); it was "
                            "truncated or damaged after the checks: copy it again.") from e
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def _queue_reads(layout: dict[str, list[Stored]], out: dict[str, torch.Tensor], jobs: queue.SimpleQueue,
                 fds: dict[Path, int], device: torch.device) -> None:
    """Allocate each tensor of `layout` into `out`, and queue the reads that fill it."""
    for name, parts in layout.items():
        first = parts[0]
        if any(p.dtype != first.dtype or p.shape[1:] != first.shape[1:] for p in parts):
            raise Qwen3AotError(f"the tensors that make {name} ({', '.join(p.name for p in parts)}) differ in dtype "
                                "or trailing shape; the checkpoint is not a Qwen3 one.")
        shape = (sum(p.shape[0] for p in parts), *first.shape[1:]) if first.shape else ()
        out[name] = t = torch.empty(shape, dtype=first.dtype, device=device)
        flat, at = t.view(-1).view(torch.uint8), 0
        for p in parts:
            for a in range(0, p.nbytes, CHUNK_BYTES):
                n = min(CHUNK_BYTES, p.nbytes - a)
                jobs.put((fds[p.file], p.file, p.start + a, flat[at + a:at + a + n]))
            at += p.nbytes


def _run_reads(jobs: queue.SimpleQueue, device: torch.device) -> None:
    errors: list[BaseException] = []
    # grad modes are per thread: tensors made under the caller's inference_mode are inference
    # tensors, which the readers' copy_ may write only in inference mode too
    inference = torch.is_inference_mode_enabled()

    def work() -> None:
        try:
            with torch.inference_mode(inference):
                _gpu_reads(jobs, device) if device.type == "cuda" else _cpu_reads(jobs)
        except BaseException as e:  # noqa: BLE001  (raised below, in the caller's thread)
            errors.append(e)
            while not jobs.empty():  # the others stop too
                jobs.get_nowait()

    threads = [threading.Thread(target=work, name=f"qwen3-aot read {i}", daemon=True)
               for i in range(min(READ_THREADS, os.cpu_count() or 1, max(1, jobs.qsize())))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _next(jobs: queue.SimpleQueue):
    try:
        return jobs.get_nowait()
    except queue.Empty:
        return None


def _cpu_reads(jobs: queue.SimpleQueue) -> None:
    while (job := _next(jobs)) is not None:
        fd, f, offset, dest = job
        _read_into(fd, f, dest.numpy(), offset)


def _gpu_reads(jobs: queue.SimpleQueue, device: torch.device) -> None:
    stream = torch.cuda.Stream(device)
    buffers = [torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    copied: list[torch.cuda.Event | None] = [None, None]  # when each buffer may be refilled
    turn = 0
    with torch.cuda.device(device), torch.cuda.stream(stream):
        while (job := _next(jobs)) is not None:
            fd, f, offset, dest = job
            if copied[turn] is not None:
                copied[turn].synchronize()
            staged = buffers[turn][:dest.numel()]
            _read_into(fd, f, staged.numpy(), offset)
            dest.copy_(staged, non_blocking=True)
            copied[turn] = torch.cuda.Event()
            copied[turn].record(stream)
            turn ^= 1
    stream.synchronize()


def _read_into(fd: int, f: Path, view: np.ndarray, offset: int) -> None:
    done = 0
    while done < view.nbytes:
        n = os.preadv(fd, [memoryview(view[done:])], offset + done)
        if n == 0:
            raise OSError(0, "the file ends before the tensor's bytes do", str(f))
        done += n
