"""torch.onnx export of the past/present-KV Qwen3 graph (build/onnx_graph.py) into
model.onnx + model.onnx.data, and its check against the eager model."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch

from qwen3_aot.driver import FlatBatchDriver
from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.model import Qwen3ForCausalLM
from qwen3_aot.weights import dtype_name

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
KV_LAYOUT = ["batch", "kv_heads", "past", "head_dim"]
_DTYPES = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16", "INT64": "int64"}


def require(*modules: str) -> None:
    """Import the optional ONNX packages, or say how to get them."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise Qwen3AotError(f"the ONNX format needs {name}, which is not installed: "
                                "pip install 'qwen3-aot[onnx]'.") from e


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
    return (["input_ids", "position_ids", "attention_mask", "logits_indices"] + [f"past_{n}" for n in kv],
            ["logits"] + [f"present_{n}" for n in kv])


def example_inputs(model: Qwen3ForCausalLM) -> tuple:
    """B=2, T=5, P=3, N=4: every dynamic size >= 2 and all different, so none is
    specialised or tied to another by its example value."""
    cfg, dev = model.config, model.device
    b, t, p = 2, 5, 3
    past = [torch.zeros(b, cfg.num_key_value_heads, p, cfg.head_dim, dtype=model.dtype, device=dev)
            for _ in range(2 * cfg.num_hidden_layers)]
    return (torch.arange(b * t, device=dev).reshape(b, t) % cfg.vocab_size,
            torch.arange(p, p + t, device=dev).expand(b, t).contiguous(),
            torch.ones(b, p + t, dtype=torch.int64, device=dev),
            torch.tensor([0, 2, 3, 4], device=dev), past)


def dynamic_shapes(num_layers: int) -> tuple:
    Dim = torch.export.Dim
    batch, seq, past, total, cols = Dim("batch"), Dim("seq"), Dim("past"), Dim("total"), Dim("logit_cols")
    return ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: total}, {0: cols},
            [{0: batch, 2: past}] * (2 * num_layers))


def _specs(values) -> list[dict]:
    """name, shape (ints and dim names) and dtype of the saved graph's inputs or outputs."""
    from onnx import TensorProto

    return [{"name": v.name,
             "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
             "dtype": _DTYPES[TensorProto.DataType.Name(v.type.tensor_type.elem_type)]} for v in values]


def export_onnx(model: Qwen3ForCausalLM, out_dir: Path, log: Callable[[str], None]) -> dict:
    """Export `model` to out_dir/model.onnx (weights in model.onnx.data, so models over the
    2 GB protobuf limit work) and check it with onnx.checker; returns the manifest entry."""
    require("onnx", "onnxscript", "onnx_ir")
    import onnx
    import onnx_ir
    import onnxscript

    from qwen3_aot.build.onnx_graph import OPSET, OnnxQwen3, translation_table

    cfg = model.config
    inputs, outputs = io_names(cfg.num_hidden_layers)
    with torch.no_grad(), warnings.catch_warnings():
        # one Dim object shared by the 2L past tensors: torch says so once per tensor
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
        program = torch.onnx.export(
            OnnxQwen3(model).eval(), example_inputs(model), dynamo=True, opset_version=OPSET,
            custom_translation_table=translation_table(), dynamic_shapes=dynamic_shapes(cfg.num_hidden_layers),
            input_names=inputs, output_names=outputs, optimize=True, verbose=False)
    for node in program.model.graph:
        node.metadata_props.clear()  # torch's per-node stack traces: build-machine paths, 1 kB a node
    path = Path(out_dir) / ONNX_FILE
    onnx_ir.save(program.model, path, external_data=DATA_FILE)
    onnx.checker.check_model(str(path), full_check=True)  # the path form: reads external data lazily
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = sorted({n.op_type for n in graph.node})
    log(f"[onnx] {len(graph.node)} nodes, opset {OPSET}: {', '.join(ops)}")
    dtype = dtype_name(model.dtype)
    return {
        "file": ONNX_FILE,
        "external_data": DATA_FILE,
        "opset": OPSET,
        "dtype": dtype,
        "exporter": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__},
        "inputs": _specs(graph.input),
        "outputs": _specs(graph.output),
        "kv_cache": {
            "layout": KV_LAYOUT, "num_layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "dtype": dtype, "past": "past_key_{i}, past_value_{i}",
            "present": "present_key_{i}, present_value_{i} = past + the new tokens (feed back as the next past)",
        },
        "attention_mask": "[batch, past + seq] int64, 1 for real tokens and 0 for padding (left padding); "
                          "new token t attends to valid slots <= past + t",
        "logits": "[batch, len(logits_indices), vocab] fp32 at the new-token columns logits_indices",
        "vocab_size": cfg.vocab_size,
        "max_positions": int(model.cos_sin.shape[0]),  # the RoPE table's rows: the artifact's max_model_len
    }


def verify_onnx(artifact_dir: Path, entry: dict, model: Qwen3ForCausalLM, log: Callable[[str], None]) -> float:
    """Run the saved graph under onnxruntime as a service would and compare with the eager
    model: a padded prefill of three lengths (every position), then through the past cache a
    3-token chunk and a 1-token decode step. Raises Qwen3AotError on a mismatch."""
    from qwen3_aot.build.pipeline import VERIFY_TOL
    from qwen3_aot.runtime.onnx.onnx_forward import OnnxForward

    fwd = OnnxForward(artifact_dir, {"graphs": {"onnx": entry}})
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 33)]
    want = [w.cpu() for w in FlatBatchDriver.of(model).logits(seqs)]
    got = fwd.logits(seqs)
    _, state = fwd.prefill([s[:-4] for s in seqs])
    chunk, state = fwd.extend(state, [s[-4:-1] for s in seqs], all_logits=True)
    step, _ = fwd.extend(state, [s[-1:] for s in seqs])
    tails = torch.cat([chunk, step[:, None]], dim=1)
    errors = {}
    for name, a, b in (("prefill", torch.cat(got), torch.cat(want)),
                       ("past-KV steps", tails.flatten(0, 1), torch.cat([w[-4:] for w in want]))):
        errors[name] = float((a.double() - b.double()).norm() / b.double().norm()) \
            if torch.isfinite(a).all() else float("inf")
    err = max(errors.values())
    tol = VERIFY_TOL[model.dtype]
    log(f"[verify onnx] onnxruntime ({fwd.provider}) vs eager logits: relative error "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    if err > tol:
        raise Qwen3AotError(f"the ONNX graph disagrees with the eager model ({errors}, bound {tol:.0e}); "
                            "the build is not kept.")
    return err
