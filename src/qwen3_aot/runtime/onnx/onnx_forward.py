"""An artifact's model.onnx under onnxruntime: prefill and decode of a static batch with the
graph's past/present KV tensors (see qwen3_aot/build/onnx_graph.py for the inputs).

Static batching: the sequences of a batch are left-padded to one length, prefilled together
and decoded in lockstep; each step's present outputs are fed back as the next past inputs,
as OrtValues on the session's device (no trip through the host). The Attention node writes
past + new into a fresh present, so a step copies the cache: O(length) per step, the price
of onnxruntime's past/present interface (the pt2 artifact's paged cache is written in
place). No model code and no transformers: the manifest entry says all the graph needs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from qwen3_aot.errors import Qwen3AotError

INSTALL_HINT = "pip install 'qwen3-aot[onnx]' (on a GPU, onnxruntime-gpu instead of onnxruntime)"
_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16: numpy has no bfloat16, OrtValue takes the ONNX type id
_KV_TYPES: dict[str, Any] = {"float32": np.float32, "float16": np.float16, "bfloat16": _BFLOAT16}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise Qwen3AotError(f"ONNX artifacts run on onnxruntime, which is not installed: {INSTALL_HINT}.") from e
    return onnxruntime


@dataclasses.dataclass(frozen=True)
class KVState:
    """A batch's cache after a step. Immutable: extending it returns a new state, so one
    prefix can be continued several ways (the old OrtValues stay valid)."""

    past: tuple  # OrtValue per past input, [batch, kv_heads, length, head_dim]
    attention_mask: np.ndarray  # [batch, length] int64: 0 where a slot is left padding
    next_positions: np.ndarray  # [batch] int64: the position of each row's next token

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]


class OnnxForward:
    """Runs an artifact's ONNX graph on onnxruntime's CUDA provider (onnxruntime-gpu and a
    GPU present, or device='cuda') or else its CPU provider.

    bfloat16 graphs need the CUDA provider: onnxruntime's CPU provider has no bfloat16
    Gemm (seen with onnxruntime 1.30 and 1.32), so they are refused on CPU up front."""

    def __init__(self, artifact_dir: str | Path, manifest: dict, device: str | torch.device | None = None) -> None:
        self._ort = ort = import_onnxruntime()
        entry = manifest.get("graphs", {}).get("onnx")
        if entry is None:
            raise Qwen3AotError(f"{artifact_dir} has no ONNX graph; build it with --format onnx (or pt2,onnx).")
        self.device = _pick_device(ort, device)
        kv = entry["kv_cache"]
        self.dtype = kv["dtype"]
        if self.dtype == "bfloat16" and self.device.type == "cpu":
            raise Qwen3AotError("this ONNX artifact is bfloat16, and onnxruntime's CPU provider has no bfloat16 "
                                "Gemm; run it on a GPU with onnxruntime-gpu, or rebuild it with --dtype float16 "
                                "or --dtype float32 to run on CPU.")
        self._ort_device = "cuda" if self.device.type == "cuda" else "cpu"
        self._device_id = self.device.index or 0
        providers: list = (["CPUExecutionProvider"] if self.device.type == "cpu" else
                           [("CUDAExecutionProvider", {"device_id": self._device_id}), "CPUExecutionProvider"])
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT warns about shape ops it places on CPU
        path = Path(artifact_dir) / entry["file"]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types, all of them opaque
            raise Qwen3AotError(f"onnxruntime {ort.__version__} could not load {path} ({self.dtype}) with "
                                f"{providers}: {e}") from e
        self.provider = self.session.get_providers()[0]
        if self.device.type == "cuda" and self.provider != "CUDAExecutionProvider":
            raise Qwen3AotError("onnxruntime could not start its CUDA provider (CUDA 13 / cuDNN 9 libraries "
                                "missing?); see onnxruntime-gpu's install notes, or use device='cpu'.")
        self.kv_heads, self.head_dim = kv["kv_heads"], kv["head_dim"]
        self.vocab_size, self.max_positions = entry["vocab_size"], entry["max_positions"]
        self._past_names = [i["name"] for i in entry["inputs"] if i["name"].startswith("past_")]
        self._present_names = [o["name"] for o in entry["outputs"] if o["name"].startswith("present_")]

    def empty_state(self, batch: int) -> KVState:
        shape = [batch, self.kv_heads, 0, self.head_dim]
        new = self._ort.OrtValue.ortvalue_from_shape_and_type
        past = tuple(new(shape, _KV_TYPES[self.dtype], self._ort_device, self._device_id) for _ in self._past_names)
        return KVState(past, np.zeros((batch, 0), np.int64), np.zeros(batch, np.int64))

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
            logits_indices: np.ndarray, past: Sequence) -> tuple[torch.Tensor, tuple]:
        """One call of the graph: fp32 logits [B, N, vocab] on the CPU, and the present OrtValues."""
        binding = self.session.io_binding()
        for name, arr in (("input_ids", input_ids), ("position_ids", position_ids),
                          ("attention_mask", attention_mask), ("logits_indices", logits_indices)):
            binding.bind_cpu_input(name, np.ascontiguousarray(arr, dtype=np.int64))
        for name, value in zip(self._past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self._present_names:
            binding.bind_output(name, self._ort_device, self._device_id)
        self.session.run_with_iobinding(binding)
        out = binding.get_outputs()
        return torch.from_numpy(out[0].numpy()), tuple(out[1:])

    def prefill(self, sequences: list[list[int]], all_logits: bool = False) -> tuple[torch.Tensor, KVState]:
        """Left-pad the sequences to one length and run them: logits of each row's last token
        [B, vocab] (or of every column [B, T, vocab]), and the cache."""
        lengths = [len(s) for s in sequences]
        if not lengths or min(lengths) < 1:
            raise Qwen3AotError("every sequence needs at least one token.")
        t = max(lengths)
        ids = np.zeros((len(sequences), t), np.int64)
        mask = np.zeros_like(ids)
        for row, seq in enumerate(sequences):
            ids[row, t - len(seq):] = seq
            mask[row, t - len(seq):] = 1
        return self._step(self.empty_state(len(sequences)), ids, mask, np.maximum(mask.cumsum(1) - 1, 0), all_logits)

    def extend(self, state: KVState, tokens: Sequence[Sequence[int]] | np.ndarray,
               all_logits: bool = False) -> tuple[torch.Tensor, KVState]:
        """Run T more tokens per row ([B, T]: one for a decode step) after `state`."""
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != state.attention_mask.shape[0] or ids.shape[1] < 1:
            raise Qwen3AotError(f"extend takes [batch={state.attention_mask.shape[0]}, T>=1] tokens, got {ids.shape}.")
        positions = state.next_positions[:, None] + np.arange(ids.shape[1])
        return self._step(state, ids, np.ones_like(ids), positions, all_logits)

    def _step(self, state: KVState, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
              all_logits: bool) -> tuple[torch.Tensor, KVState]:
        if int(positions.max()) >= self.max_positions:
            raise Qwen3AotError(f"position {int(positions.max())} is past the model's max_position_embeddings "
                                f"({self.max_positions}); shorten the prompt or max_new_tokens.")
        t = ids.shape[1]
        full_mask = np.concatenate([state.attention_mask, mask], axis=1)
        cols = np.arange(t) if all_logits else np.array([t - 1])
        logits, present = self.run(ids, positions, full_mask, cols, state.past)
        return (logits if all_logits else logits[:, 0]), KVState(present, full_mask, positions[:, -1] + 1)

    def logits(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """fp32 logits [len, vocab] for every position of every sequence, in one padded batch."""
        lg, _ = self.prefill(sequences, all_logits=True)
        return [lg[row, lg.shape[1] - len(seq):] for row, seq in enumerate(sequences)]

    def generate_greedy(self, sequences: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Exactly `max_new_tokens` greedy tokens per sequence (no eos stop), in lockstep."""
        if max_new_tokens < 1:
            raise Qwen3AotError("max_new_tokens must be at least 1.")
        if max(map(len, sequences), default=0) + max_new_tokens > self.max_positions:
            raise Qwen3AotError(f"prompt + max_new_tokens exceeds the model's max_position_embeddings "
                                f"({self.max_positions}); shorten the prompt or max_new_tokens.")
        logits, state = self.prefill(sequences)
        out = [logits.argmax(-1)]
        for _ in range(max_new_tokens - 1):
            logits, state = self.extend(state, out[-1][:, None].numpy())
            out.append(logits.argmax(-1))
        return torch.stack(out, dim=1).tolist()


def _pick_device(ort, device: str | torch.device | None) -> torch.device:
    """cuda when onnxruntime has its CUDA provider and torch sees a GPU, else cpu."""
    has_cuda_provider = "CUDAExecutionProvider" in ort.get_available_providers()
    if device is None:
        return torch.device("cuda" if has_cuda_provider and torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise Qwen3AotError(f"device {device!r} is not supported for ONNX artifacts; use cpu or cuda.")
    if dev.type == "cuda" and not has_cuda_provider:
        raise Qwen3AotError(f"onnxruntime {ort.__version__} here has no CUDA provider "
                            f"({ort.get_available_providers()}): pip install onnxruntime-gpu (1.27 and later are "
                            "built for CUDA 13), or use device='cpu'.")
    return dev
