"""The export command and the artifact it writes: manifest, weights once, refusals, and a
package that loads in a fresh process and writes the caller's KV cache in place."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from safetensors import safe_open

from artifact_damage import edit_manifest, flip_byte, rewrite_with_checksums
from random_checkpoints import write_random_checkpoint
from suite_support import FIXTURE, HAS_CUDA
from qwen3_aot import Qwen3AotError, manifest
from qwen3_aot.build import export
from qwen3_aot.build.pipeline import remove_stale_partials, verify
from qwen3_aot.cli import main as cli
from qwen3_aot.driver import FlatBatchDriver
from qwen3_aot.manifest import sha256
from qwen3_aot.model import Qwen3ForCausalLM
from qwen3_aot.runtime import load_forward
from qwen3_aot.runtime.forward.extraction import remove_stale_extractions


def test_manifest_describes_the_artifact(tiny_artifact):
    man = json.loads((tiny_artifact / "manifest.json").read_text())
    assert man["format_version"] == 1 and man["device"] == "cpu" and man["dtype"] == "float32"
    assert man["build_env"]["torch"] == torch.__version__
    assert man["model_config"]["num_hidden_layers"] == 4
    names = [i["name"] for i in man["graphs"]["forward"]["inputs"]]
    assert names == ["input_ids", "positions", "seq_ids", "block_tables", "logits_indices", "k_caches", "v_caches"]
    assert set(man["tokenizer_files"]) >= {"tokenizer.json", "generation_config.json"}
    files = {p.name for p in tiny_artifact.iterdir()} - {"manifest.json"}
    assert set(man["files"]) == set(man["sizes"]) == files
    assert all(sha256(tiny_artifact / f) == digest for f, digest in man["files"].items())
    assert all((tiny_artifact / f).stat().st_size == n for f, n in man["sizes"].items())


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
    drv = FlatBatchDriver.of(model)
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




@pytest.mark.parametrize("damage, needle", [
    (lambda p: (p / "weights.safetensors").write_bytes(b"x" * 100), "100 bytes, the manifest says"),
    (lambda p: flip_byte(p / "model.pt2", at=-100), "checksum"),
    (lambda p: (p / "model.pt2").unlink(), "missing"),
    (lambda p: (p / "manifest.json").unlink(), "not a qwen3-aot artifact"),
    (lambda p: (p / "manifest.json").write_text("{"), "damaged"),
    (lambda p: edit_manifest(p, lambda m: m.update(format_version=99)), "format version 99"),
    (lambda p: edit_manifest(p, lambda m: m["build_env"].update(torch="1.0.0")), "torch 1.0.0"),
    (lambda p: edit_manifest(p, lambda m: m.pop("graphs")), "lacks graphs"),
    (lambda p: edit_manifest(p, lambda m: m.pop("build_env")), "lacks build_env"),
    (lambda p: edit_manifest(p, lambda m: m.pop("files")), "lacks files"),
    (lambda p: edit_manifest(p, lambda m: m["graphs"]["forward"].pop("file")), "graphs.forward.file"),
    (lambda p: edit_manifest(p, lambda m: m.update(dtype="int4")), "dtype 'int4'"),
    (lambda p: edit_manifest(p, lambda m: m.update(weights=None)), "no weights file"),
    (lambda p: rewrite_with_checksums(p, "model.pt2", b"PK\x03\x04 not a zip at all" * 100), "AOTInductor package"),
    (lambda p: rewrite_with_checksums(p, "weights.safetensors", b"\x08" + b"\x00" * 7 + b"{garbage}"),
     "no valid safetensors header"),
])
def test_runtime_refuses_a_bad_artifact(artifact_copy, damage, needle):
    damage(artifact_copy)
    with pytest.raises(Qwen3AotError, match=needle):
        load_forward(artifact_copy)


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without a GPU")
def test_cuda_artifact_on_a_machine_without_gpu_is_refused(artifact_copy):
    edit_manifest(artifact_copy, lambda m: m.update(device="cuda"))
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
        export(bad, out, device="cpu", log=lambda _m: None)
    assert list(tmp_path.iterdir()) == [bad]  # no output, no partial directory


@pytest.mark.parametrize("kwargs, needle", [
    (dict(dtype="int8"), "dtype 'int8'"),
    (dict(device="tpu"), "device 'tpu'"),
    (dict(formats=("tflite",)), "formats"),
])
def test_bad_options_are_refused(tmp_path, kwargs, needle):
    with pytest.raises(Qwen3AotError, match=needle):
        export(FIXTURE, tmp_path / "out", **{"device": "cpu", **kwargs}, log=lambda _m: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_is_said_plainly(tmp_path, capsys):
    assert cli(["export", str(FIXTURE), "-o", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_a_stale_extraction_is_removed_and_a_live_one_kept(tiny_artifact, tmp_path):
    stale = tmp_path / "aotinductor_Ab12Cd"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "wrapper.so").write_bytes(b"x")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    young = tmp_path / "aotinductor_Young1"
    young.mkdir()
    assert remove_stale_extractions((str(tmp_path),)) == [stale]
    assert not stale.exists() and young.exists()
    compiled = load_forward(tiny_artifact)  # noqa: F841  (its extraction is mapped while it lives)
    maps = open("/proc/self/maps").read().split()
    live = {os.path.dirname(os.path.dirname(p.split("/model/")[0] + "/x")) for p in maps if "/aotinductor_" in p}
    for d in live:
        assert d not in map(str, remove_stale_extractions((d,), older_than_s=0))
        assert os.path.isdir(d)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def test_stale_partials_of_dead_processes_are_cleaned(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".a.partial-{dead}").mkdir()                    # half-built: removed
    (tmp_path / f".b.old-{dead}").mkdir()                        # renamed away, nothing in its place: restored
    (tmp_path / "c").mkdir()
    (tmp_path / f".c.old-{dead}").mkdir()                        # renamed away, replaced: removed
    (tmp_path / f".d.partial-{os.getpid()}").mkdir()             # a live export's: kept
    remove_stale_partials(tmp_path, lambda _m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["b", "c", f".d.partial-{os.getpid()}"])


def test_sigterm_during_an_export_leaves_no_partial(tmp_path):
    out = tmp_path / "out"
    r = subprocess.Popen([sys.executable, "-m", "qwen3_aot.cli", "export", str(FIXTURE), "-o", str(out),
                          "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    partial = tmp_path / f".out.partial-{r.pid}"
    deadline = time.monotonic() + 120
    while not partial.exists() and r.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert partial.exists(), "the export never started"
    time.sleep(0.5)
    r.send_signal(signal.SIGTERM)
    r.communicate(timeout=120)
    assert r.returncode == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, value", [("--block-size", "0"), ("--max-num-seqs", "-3"), ("--max-num-tokens", "0"),
                                         ("--max-model-len", "-1")])
def test_bad_limit_flags_are_refused_before_any_work(tmp_path, capsys, flag, value):
    assert cli(["export", str(FIXTURE), "-o", str(tmp_path / "o"), "--device", "cpu", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {value} is not allowed" in err and "[load]" not in err
    assert list(tmp_path.iterdir()) == []


def test_verify_measures_compiled_and_eager_against_float64(tiny_artifact):
    lines = []
    model = Qwen3ForCausalLM.from_pretrained(FIXTURE, dtype="float32", device="cpu")
    err_compiled, err_eager = verify(tiny_artifact, model, lines.append)
    assert 0 < err_eager < 1e-5 and 0 < err_compiled < 1e-5  # fp32 against float64: rounding only
    assert f"compiled {err_compiled:.2e}" in lines[0] and f"eager {err_eager:.2e}" in lines[0]


def _perturb_compiled_weights(artifact, name, relative):
    """The compiled path made worse: noise on one weight in the artifact only, the eager model intact."""
    from safetensors.torch import load_file, save_file

    w = load_file(artifact / "weights.safetensors")
    t = w[name].float()
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) * t.std() * relative
    w[name] = (t + noise).to(w[name].dtype)
    save_file(w, artifact / "weights.safetensors")


# the tests of a module-scoped artifact share one pytest-xdist worker, which builds it once
ON_K_NORM_WORKER = pytest.mark.xdist_group("k_norm_bf16")


@pytest.fixture(scope="module")
def k_norm_checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("kn") / "ckpt")


@pytest.fixture(scope="module")
def k_norm_bf16(k_norm_checkpoint, tmp_path_factory):
    """The extreme-k_norm checkpoint built in bf16 with the build's own check."""
    return export(k_norm_checkpoint, tmp_path_factory.mktemp("kn-art") / "art", device="cpu",
                           dtype="bfloat16", log=lambda _m: None)


@ON_K_NORM_WORKER
@pytest.mark.parametrize("which, relative", [("fp32", 1e-4), ("bf16", 0.1)])
def test_a_compiled_graph_worse_than_eager_is_refused(request, tmp_path, which, relative):
    """1e-4 relative noise on one fp32 matrix (logits off by 4e-5, eager 5e-7 from float64), and
    10% on one bf16 matrix (compiled 7e-2 from float64, eager 3.6e-2): both refused."""
    art, ckpt, dtype = ((request.getfixturevalue("tiny_artifact"), FIXTURE, "float32") if which == "fp32" else
                        (request.getfixturevalue("k_norm_bf16"), request.getfixturevalue("k_norm_checkpoint"),
                         "bfloat16"))
    worse = shutil.copytree(art, tmp_path / "worse")
    _perturb_compiled_weights(worse, "layers.1.down_proj", relative)
    model = Qwen3ForCausalLM.from_pretrained(ckpt, dtype=dtype, device="cpu")
    with pytest.raises(Qwen3AotError, match="less accurate than the eager model"):
        verify(worse, model, lambda _m: None)


@ON_K_NORM_WORKER
def test_extreme_k_norm_builds_are_kept_and_force_replaces_atomically(k_norm_checkpoint, k_norm_bf16):
    """bf16 (built by the fixture) and fp16 builds of the extreme-k_norm checkpoint pass the
    check; the fp16 one replaces the bf16 one with --force, which stays loadable until then."""
    assert manifest.read(k_norm_bf16)["dtype"] == "bfloat16"
    seen = []

    def log(msg):
        if msg.startswith("[verify] compiled vs eager"):
            seen.append(msg)
            assert manifest.read(k_norm_bf16)["dtype"] == "bfloat16"  # the old artifact, whole, still there

    export(k_norm_checkpoint, k_norm_bf16, device="cpu", dtype="float16", force=True, log=log)
    assert len(seen) == 1 and "compiled" in seen[0] and "eager" in seen[0]
    assert manifest.read(k_norm_bf16)["dtype"] == "float16"
    assert sorted(p.name for p in k_norm_bf16.parent.iterdir()) == [k_norm_bf16.name]


def test_every_dtype_name_a_manifest_records_reads_back():
    from qwen3_aot.weights import DTYPES, dtype_name, parse_dtype

    assert {dtype_name(d): parse_dtype(dtype_name(d)) for d in DTYPES.values()} == DTYPES
    with pytest.raises(Qwen3AotError, match="float64 is not supported"):
        dtype_name(torch.float64)


# ---- --weights link: the checkpoint's files hard-linked, fused at load ----

@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
    """The trained fixture with its tensors in two shards and an index, as large checkpoints come."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path_factory.mktemp("sharded") / "ckpt"
    shutil.copytree(FIXTURE, ckpt, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(FIXTURE / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, ns in shards.items():
        save_file({n: tensors[n] for n in ns}, str(ckpt / f), metadata={"format": "pt"})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, ns in shards.items() for n in ns}}))
    return ckpt


@pytest.fixture(scope="module")
def linked_artifact(sharded_checkpoint, tmp_path_factory):
    return export(sharded_checkpoint, tmp_path_factory.mktemp("linked") / "art", device="cpu",
                           weights="link", log=lambda _m: None)


ON_LINKED_WORKER = pytest.mark.xdist_group("linked_artifact")  # as ON_K_NORM_WORKER
LINKED = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]


@ON_LINKED_WORKER
def test_a_linked_artifact_holds_the_checkpoints_files_and_no_copy(linked_artifact, sharded_checkpoint,
                                                                   tiny_artifact):
    for f in LINKED:  # the same inode: hard links, which survive the checkpoint moving or going
        assert os.stat(linked_artifact / f).st_ino == os.stat(sharded_checkpoint / f).st_ino
    own = {p.name for p in linked_artifact.iterdir()} - set(LINKED)
    assert own == {p.name for p in tiny_artifact.iterdir()} - {"weights.safetensors"} | {"buffers.safetensors"}
    with safe_open(str(linked_artifact / "buffers.safetensors"), "pt") as f:
        assert set(f.keys()) == {"cos_sin"}  # computed, not read: no weight is stored twice
    man = manifest.read(linked_artifact)
    assert man["weights"]["files"] == LINKED[:2] and man["weights"]["index"] == LINKED[2]
    assert man["weights"]["fused_at_load"] and man["weights"]["names"]["layer"]["layers.{i}.qkv_proj"] == [
        f"model.layers.{{i}}.self_attn.{x}_proj.weight" for x in "qkv"]
    for f in LINKED:
        assert man["files"][f] == sha256(sharded_checkpoint / f)
        assert man["sizes"][f] == (sharded_checkpoint / f).stat().st_size


@ON_LINKED_WORKER
def test_a_linked_artifact_computes_what_the_copied_one_does(linked_artifact, tiny_artifact):
    """The graph gets the same constants, bit for bit (q/k/v and gate/up fused at load). The
    logits agree to fp32 rounding, not bitwise: on CPU a matmul's summation order depends on
    where its weight lies in memory (16-byte against 64-byte alignment), which differs
    between the two reads; with both sets of weights cloned to fresh memory they were equal."""
    from suite_support import rel_err

    linked, copied = load_forward(linked_artifact), load_forward(tiny_artifact)
    assert linked.weights.keys() == copied.weights.keys()
    assert all(torch.equal(linked.weights[k], copied.weights[k]) for k in copied.weights)
    cfg = Qwen3ForCausalLM.from_pretrained(FIXTURE, dtype="float32", device="cpu").config

    seqs = [[5, 6, 7, 8, 9, 10, 11], list(range(40, 80))]
    got = [torch.cat(FlatBatchDriver(f, cfg, torch.float32, torch.device("cpu"), 16).logits(seqs))
           for f in (linked, copied)]
    assert rel_err(got[0], got[1]) < 1e-6  # each is about 5e-7 from float64 (verify's log)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(dtype="bfloat16"), "stores 46 tensor\\(s\\) in another dtype than bfloat16"),
    (dict(formats=("onnx",)), "--weights link is for the pt2 graph"),
])
def test_a_checkpoint_that_cannot_be_linked_is_refused_before_any_work(sharded_checkpoint, tmp_path, kwargs, needle):
    lines = []
    with pytest.raises(Qwen3AotError, match=needle):
        export(sharded_checkpoint, tmp_path / "out", **{"device": "cpu", "weights": "link", **kwargs},
                        log=lines.append)
    assert lines == [] and list(tmp_path.iterdir()) == []


def test_a_link_across_filesystems_is_refused(sharded_checkpoint):
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(sharded_checkpoint).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temporary directory")
    import tempfile

    with tempfile.TemporaryDirectory(dir=shm) as d:
        with pytest.raises(Qwen3AotError, match="another filesystem.*--weights copy"):
            export(sharded_checkpoint, f"{d}/out", device="cpu", weights="link", log=lambda _m: None)
        assert os.listdir(d) == []


@ON_LINKED_WORKER
@pytest.mark.parametrize("damage, needle", [
    (lambda p: (p / LINKED[1]).write_bytes((p / LINKED[1]).read_bytes()[:-100]), "the manifest says"),
    (lambda p: rewrite_with_checksums(p, LINKED[0], b"\x08" + b"\x00" * 7 + b"{garbage}"),
     "no valid safetensors header"),
    (lambda p: rewrite_with_checksums(p, LINKED[2], b"{not an index"), "not a valid safetensors index"),
    (lambda p: edit_manifest(p, lambda m: m["weights"]["names"]["global"].update(norm=["model.final_norm.weight"])),
     "another rule"),
])
def test_a_damaged_linked_artifact_is_refused(linked_artifact, tmp_path, damage, needle):
    """On a copy (damaging a link would damage the checkpoint it shares bytes with)."""
    art = shutil.copytree(linked_artifact, tmp_path / "copy")
    damage(art)
    with pytest.raises(Qwen3AotError, match=needle):
        load_forward(art)


@ON_LINKED_WORKER
def test_check_catches_a_damaged_byte_in_a_linked_file(linked_artifact, tmp_path, capsys):
    art = shutil.copytree(linked_artifact, tmp_path / "copy")
    assert cli(["check", str(art)]) == 0 and f"{LINKED[1]}: " in capsys.readouterr().out
    flip_byte(art / LINKED[1])
    assert cli(["check", str(art)]) == 2
    assert f"{LINKED[1]} does not match its checksum" in capsys.readouterr().err


def test_a_running_stage_logs_its_elapsed_seconds_until_it_ends():
    import re

    from qwen3_aot.build.pipeline import HEARTBEAT_S, stage

    lines: list[str] = []
    with stage("compile", lines.append, heartbeat_s=0.05):
        time.sleep(0.3)
    ended = len(lines)
    time.sleep(0.15)
    assert len(lines) == ended  # the heartbeat stopped with the stage
    assert lines[0] == "[compile] ..." and re.fullmatch(r"\[compile\] done in 0\.[3-9] s", lines[-1])
    beats = lines[1:-1]
    assert len(beats) >= 3 and all(re.fullmatch(r"\[compile\] \.\.\. \d+ s", b) for b in beats)
    assert HEARTBEAT_S <= 10

    lines.clear()
    with pytest.raises(KeyboardInterrupt), stage("compile", lines.append, heartbeat_s=0.02):
        time.sleep(0.1)
        raise KeyboardInterrupt
    stopped = len(lines)
    time.sleep(0.1)
    assert len(lines) == stopped and not any("done" in m for m in lines)  # Ctrl-C ends it too, no "done"


def test_torchs_leafspec_deprecation_is_the_one_warning_the_compile_hides():
    import copy
    import warnings

    import torch.utils._pytree as pytree

    from qwen3_aot.build.aoti import leafspec_deprecation_ignored

    spec = pytree.tree_flatten([1, 2])[1]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with leafspec_deprecation_ignored():
            copy.deepcopy(spec)  # what Inductor's debug wrapper does to the graph (torch 2.13 warns)
            warnings.warn("any other FutureWarning", FutureWarning)
    assert [str(w.message) for w in seen] == ["any other FutureWarning"]


# ---- the small-batch graph (built on CUDA only: on a CPU its ops are the same reference kernels) ----

def test_the_small_batch_graph_exports_its_fused_ops_and_computes_the_forward():
    """Its export holds the fused projections and no matmul of its own (lm_head's is the one
    F.linear left), leaves the model as it was, and computes what the main forward computes
    over the build check's steps (prompts in one step, then decodes), fp32 within 1e-5."""
    from qwen3_aot.build.graph import GraphLimits, export_forward
    from qwen3_aot.build.pipeline import check_logits, check_sequences

    model = Qwen3ForCausalLM.from_pretrained(FIXTURE, dtype="float32", device="cpu")
    limits = GraphLimits().resolved(model.config.max_position_embeddings)
    model.small_batch = "as the caller left it"
    ep = export_forward(model, limits, small_batch=True)
    assert model.small_batch == "as the caller left it"
    model.small_batch = False  # the main forward, for the comparison
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    layers = model.config.num_hidden_layers
    assert targets.count("qwen3_aot.small_linear.default") == 2 * layers
    assert targets.count("qwen3_aot.add_rms_norm_linear.default") == 2 * layers - 1
    assert sum("aten.linear" in t or "aten.mm" in t or "aten.addmm" in t for t in targets) == 1
    seqs = check_sequences(model.config.vocab_size, limits.block_size, limits.max_model_len)
    with torch.no_grad():
        small, main = (check_logits(FlatBatchDriver(f, model.config, torch.float32, torch.device("cpu")), *seqs)
                       for f in (ep.module(), model))
    assert (small - main).norm() / main.norm() <= 1e-5
