"""The runtime's safetensors reader: the fused state it reads, chunked and threaded, on the
CPU and on CUDA, is bit for bit what the build's loader makes; damage and mismatches are our error."""

import shutil

import pytest
import torch

from qwen3_aot import Qwen3AotError
from qwen3_aot.config import Qwen3Config
from qwen3_aot.runtime.forward import weight_reader
from qwen3_aot.runtime.forward.weight_reader import read_file, read_model_state, read_tensors, stored_tensors
from qwen3_aot.weights import load_checkpoint, tensor_files
from suite_support import FIXTURE, HAS_CUDA

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(scope="module")
def expected():
    cfg, state = load_checkpoint(FIXTURE)
    return cfg, state


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [weight_reader.CHUNK_BYTES, 1000])  # 1000: tensors in many chunks, threads racing
@pytest.mark.parametrize("inference", [False, True])  # the build's verify loads under inference_mode
def test_the_fused_state_equals_the_builds(expected, device, chunk, inference, monkeypatch):
    monkeypatch.setattr(weight_reader, "CHUNK_BYTES", chunk)
    cfg, want = expected
    dtype = next(iter(want.values())).dtype
    with torch.inference_mode(inference):
        got = read_model_state(tensor_files(FIXTURE), cfg, dtype, torch.device(device))
    assert got.keys() == want.keys()
    for name, t in want.items():
        g = got[name]
        assert g.device.type == device and g.dtype == t.dtype and g.shape == t.shape, name
        assert torch.equal(g.cpu(), t), name


@pytest.mark.parametrize("device", DEVICES)
def test_a_file_under_its_own_names(tmp_path, device):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 5, dtype=torch.float64), "b": torch.arange(7), "c": torch.randn(()),
               "e": torch.empty(0, 4, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "t.safetensors")
    got = read_file(tmp_path / "t.safetensors", torch.device(device))
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert torch.equal(got[k].cpu(), t), k


def test_a_file_cut_short_after_its_checks_is_our_error(tmp_path):
    shutil.copy(FIXTURE / "model.safetensors", tmp_path / "model.safetensors")
    f = tmp_path / "model.safetensors"
    stored = stored_tensors([f])  # the header checked while the file was whole
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    with pytest.raises(Qwen3AotError, match="could not be read.*copy it again"):
        read_tensors({n: [s] for n, s in stored.items()}, torch.device("cpu"))


def test_a_wrong_dtype_or_shape_is_our_error(expected):
    cfg, want = expected
    dtype = next(iter(want.values())).dtype
    other = torch.float16 if dtype != torch.float16 else torch.float32
    with pytest.raises(Qwen3AotError, match="the artifact runs"):
        read_model_state(tensor_files(FIXTURE), cfg, other, torch.device("cpu"))
    wider = Qwen3Config.from_dict({**cfg.to_dict(), "intermediate_size": cfg.intermediate_size * 2})
    with pytest.raises(Qwen3AotError, match="the config says"):
        read_model_state(tensor_files(FIXTURE), wider, dtype, torch.device("cpu"))
