"""The export command and the artifact it writes: manifest, weights once, refusals, and a
package that loads in a fresh process and writes the caller's KV cache in place."""

import json
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors import safe_open

from conftest import FIXTURE, HAS_CUDA
from qwen3_aot import Qwen3AotError
from qwen3_aot.build import export_artifact
from qwen3_aot.cli import main as cli
from qwen3_aot.manifest import sha256
from qwen3_aot.model import Qwen3ForCausalLM
from qwen3_aot.runtime import load_forward


def test_manifest_describes_the_artifact(tiny_artifact):
    man = json.loads((tiny_artifact / "manifest.json").read_text())
    assert man["format_version"] == 1 and man["device"] == "cpu" and man["dtype"] == "float32"
    assert man["build_env"]["torch"] == torch.__version__
    assert man["model_config"]["num_hidden_layers"] == 4
    names = [i["name"] for i in man["graphs"]["forward"]["inputs"]]
    assert names == ["input_ids", "positions", "seq_ids", "block_tables", "logits_indices", "k_caches", "v_caches"]
    assert set(man["tokenizer_files"]) >= {"tokenizer.json", "generation_config.json"}
    files = {p.name for p in tiny_artifact.iterdir()} - {"manifest.json"}
    assert set(man["files"]) == files
    assert all(sha256(tiny_artifact / f) == digest for f, digest in man["files"].items())


def test_weights_are_stored_once_outside_the_package(tiny_artifact):
    with safe_open(str(tiny_artifact / "weights.safetensors"), "pt") as f:
        names = set(f.keys())
        samples = [f.get_tensor(n).flatten()[:16].numpy().tobytes() for n in ("embed_tokens", "layers.3.down_proj")]
    assert "embed_tokens" in names and "lm_head" not in names  # tied: one tensor
    model = Qwen3ForCausalLM.from_pretrained(FIXTURE, dtype="float32", device="cpu")
    assert names == {n for n, _ in model.named_parameters()} | {"cos_sin"}
    # the compiled package holds code, not a second copy of the weights
    with zipfile.ZipFile(tiny_artifact / "model.pt2") as z:
        package = b"".join(z.read(n) for n in z.namelist())
    assert not any(sample in package for sample in samples)


def test_loaded_package_writes_the_callers_cache(tiny_artifact):
    """AOTInductor clones an input it cannot prove aligned: the write must land in our tensor."""
    compiled = load_forward(tiny_artifact)
    model = Qwen3ForCausalLM.from_pretrained(FIXTURE, dtype="float32", device="cpu")
    drv = model.driver()
    args = (torch.tensor([5, 6, 7, 8, 9]), torch.tensor([0, 1, 2, 3, 4]), torch.zeros(5, dtype=torch.int32),
            torch.tensor([[2]], dtype=torch.int32), torch.tensor([4]))
    k1, v1 = drv.new_kv_cache(3)
    k2, v2 = drv.new_kv_cache(3)
    with torch.no_grad():
        got, want = compiled(*args, k1, v1), model(*args, k2, v2)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(k1 + v1, k2 + v2):
        assert a[2, :5].abs().sum() > 0 and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        assert a[:2].abs().sum() == 0  # nothing written outside the sequence's block


def test_artifact_runs_in_a_fresh_process(tiny_artifact):
    code = ("import sys, torch; from qwen3_aot.runtime import load_forward; f = load_forward(sys.argv[1]);"
            "k = [torch.zeros(2, 16, 2, 32) for _ in range(4)]; v = [torch.zeros_like(t) for t in k];"
            "out = f(torch.tensor([1, 2, 3]), torch.arange(3), torch.zeros(3, dtype=torch.int32),"
            " torch.tensor([[0]], dtype=torch.int32), torch.tensor([2]), k, v);"
            "print(tuple(out.shape), bool(torch.isfinite(out).all()))")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_artifact)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["(1,", "512)", "True"]


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path):
    return shutil.copytree(tiny_artifact, tmp_path / "copy")


def _edit_manifest(path, fn):
    man = json.loads((path / "manifest.json").read_text())
    fn(man)
    (path / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize("damage, needle", [
    (lambda p: (p / "weights.safetensors").write_bytes(b"x" * 100), "checksum"),
    (lambda p: (p / "model.pt2").unlink(), "missing"),
    (lambda p: (p / "manifest.json").unlink(), "not a qwen3-aot artifact"),
    (lambda p: (p / "manifest.json").write_text("{"), "damaged"),
    (lambda p: _edit_manifest(p, lambda m: m.update(format_version=99)), "format version 99"),
    (lambda p: _edit_manifest(p, lambda m: m["build_env"].update(torch="1.0.0")), "torch 1.0.0"),
])
def test_runtime_refuses_a_bad_artifact(artifact_copy, damage, needle):
    damage(artifact_copy)
    with pytest.raises(Qwen3AotError, match=needle):
        load_forward(artifact_copy)


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without a GPU")
def test_cuda_artifact_on_a_machine_without_gpu_is_refused(artifact_copy):
    _edit_manifest(artifact_copy, lambda m: m.update(device="cuda"))
    with pytest.raises(Qwen3AotError, match="no GPU"):
        load_forward(artifact_copy)


def test_existing_output_is_refused_without_force(tiny_artifact, capsys):
    assert cli(["export", str(FIXTURE), "-o", str(tiny_artifact), "--device", "cpu"]) == 2
    assert "--force" in capsys.readouterr().err


def test_failed_build_leaves_nothing(tmp_path):
    bad = shutil.copytree(FIXTURE, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))  # a layer's tensors missing
    out = tmp_path / "out"
    with pytest.raises(Qwen3AotError, match="model.layers.4"):
        export_artifact(bad, out, device="cpu", log=lambda _m: None)
    assert list(tmp_path.iterdir()) == [bad]  # no output, no partial directory


@pytest.mark.parametrize("kwargs, needle", [
    (dict(dtype="int8"), "dtype 'int8'"),
    (dict(device="tpu"), "device 'tpu'"),
    (dict(formats=("tflite",)), "formats"),
])
def test_bad_options_are_refused(tmp_path, kwargs, needle):
    with pytest.raises(Qwen3AotError, match=needle):
        export_artifact(FIXTURE, tmp_path / "out", **{"device": "cpu", **kwargs}, log=lambda _m: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_is_said_plainly(tmp_path, capsys):
    assert cli(["export", str(FIXTURE), "-o", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
