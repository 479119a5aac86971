"""runtime.load() and what it refuses; bad requests get our error and the engine keeps
serving; the runtime stays lean; the generate command."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

from artifact_damage import edit_manifest, flip_byte, rewrite_with_checksums
from suite_support import RUNTIME_DEVICE
from qwen3_aot import Qwen3AotError, runtime
from qwen3_aot.cli import main as cli
from qwen3_aot.runtime import SamplingParams

PROMPT = "The extended form, \"assert expression1,"
GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def engine(runtime_artifact):
    return runtime.load(runtime_artifact, num_blocks=9)  # 128 tokens of cache; max_model_len is 512


@pytest.fixture
def artifact_copy(runtime_artifact, tmp_path):
    return shutil.copytree(runtime_artifact, tmp_path / "copy")


def test_importing_the_runtime_imports_neither_transformers_nor_triton_nor_serve_nor_onnx():
    code = ("import sys; import qwen3_aot.runtime; from qwen3_aot.runtime import Engine, SamplingParams, load;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'triton', 'onnx', "
            "'onnxruntime', 'fastapi', 'uvicorn') or m.startswith(('qwen3_aot.model', 'qwen3_aot.custom_ops', "
            "'qwen3_aot.build', 'qwen3_aot.serve', 'qwen3_aot.runtime.onnx', 'torch._inductor', 'torch._dynamo'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


BAD_REQUESTS = {
    "empty text": lambda e: e.generate(""),
    "empty ids": lambda e: e.generate([[]]),
    "no prompts": lambda e: e.generate([]),
    "negative id": lambda e: e.generate([[5, -1]]),
    "id past the vocab": lambda e: e.generate([[5, 512]]),
    "not a prompt": lambda e: e.generate([3.5]),
    "longer than max_model_len": lambda e: e.generate("x", dataclasses.replace(GREEDY, max_tokens=600)),
    "longer than the cache": lambda e: e.generate("x", dataclasses.replace(GREEDY, max_tokens=200)),
    "max_tokens 0": lambda e: e.generate("x", SamplingParams(max_tokens=0)),
    "top_p 0": lambda e: e.generate("x", SamplingParams(top_p=0)),
    "top_p > 1": lambda e: e.generate("x", SamplingParams(top_p=1.01)),
    "params not SamplingParams": lambda e: e.generate("x", {"max_tokens": 3}),
    "params count": lambda e: e.generate(["x", "y"], [GREEDY]),
    "stream, empty": lambda e: e.stream(""),
    "one bad in a batch": lambda e: e.generate(["fine", ""], GREEDY),
}


@pytest.mark.parametrize("bad", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_is_refused_and_the_engine_keeps_serving(engine, bad):
    want = engine.generate(PROMPT, GREEDY)[0]
    free = engine.num_free_blocks
    with pytest.raises(Qwen3AotError):
        bad(engine)
    assert engine.num_free_blocks == free and not engine.has_unfinished()
    assert engine.generate(PROMPT, GREEDY)[0] == want


def test_a_request_that_fills_the_cache_exactly_is_served(engine):
    ids = list(range(2, 100))
    c = engine.generate([ids], dataclasses.replace(GREEDY, max_tokens=engine.cache_capacity - len(ids)))[0]
    assert c.output_tokens + c.prompt_tokens == 128 == engine.cache_capacity


@pytest.mark.parametrize("damage, needle", [
    (lambda p: shutil.rmtree(p), "does not exist"),
    (lambda p: (p / "weights.safetensors").write_bytes(b"x" * 100), "100 bytes, the manifest says"),
    (lambda p: truncate(p / "weights.safetensors"), "the manifest says"),
    (lambda p: (p / "tokenizer.json").write_text("{}"), "2 bytes, the manifest says"),
    (lambda p: flip_byte(p / "tokenizer.json"), "checksum"),
    (lambda p: rewrite_with_checksums(p, "tokenizer.json", b"{not a tokenizer"), "tokenizer.json is not a tokenizer"),
    (lambda p: (p / "model.pt2").unlink(), "missing"),
    (lambda p: edit_manifest(p, lambda m: m["graphs"].pop("forward")), "no pt2 or onnx graph"),
])
def test_load_refuses_a_bad_artifact(artifact_copy, damage, needle):
    damage(artifact_copy)
    with pytest.raises(Qwen3AotError, match=needle):
        runtime.load(artifact_copy)


def truncate(f):
    f.write_bytes(f.read_bytes()[:-1000])




@pytest.mark.parametrize("options, needle", [
    (dict(device="cpu" if RUNTIME_DEVICE == "cuda" else "cuda"), f"built for {RUNTIME_DEVICE}"),
    (dict(max_num_seqs=0), "max_num_seqs=0"),
    (dict(max_num_seqs=5000), "max_num_seqs=5000"),
    (dict(max_num_batched_tokens=10**6), "max_num_batched_tokens"),
    (dict(num_blocks=1), "at least 2 blocks"),
    (dict(kv_cache_tokens=0), "kv_cache_tokens"),
])
def test_load_refuses_bad_options(runtime_artifact, options, needle):
    with pytest.raises(Qwen3AotError, match=needle):
        runtime.load(runtime_artifact, **options)


def test_cache_options(runtime_artifact):
    assert runtime.load_core(runtime_artifact, kv_cache_tokens=100).cache.capacity >= 100
    default = runtime.load_core(runtime_artifact, max_num_seqs=4)
    assert default.scheduler.max_num_seqs == 4
    if RUNTIME_DEVICE == "cpu":  # 4 full-length sequences
        assert default.cache.capacity == 4 * 512
    else:  # what fits in 90% of the GPU, at most the artifact's block limit
        assert default.cache.num_blocks * default.cache.k[0][0].nbytes * 2 * len(default.cache.k) > 2**30


def test_artifact_without_tokenizer_takes_token_ids(artifact_copy):
    from qwen3_aot import manifest

    (artifact_copy / "tokenizer.json").unlink()
    man = json.loads((artifact_copy / "manifest.json").read_text())
    man["tokenizer_files"].remove("tokenizer.json")
    manifest.write(artifact_copy, {k: v for k, v in man.items() if k != "files"})  # checksums stay valid
    eng = runtime.load(artifact_copy, num_blocks=9)
    with pytest.raises(Qwen3AotError, match="token-id prompts only"):
        eng.generate("hello")
    with pytest.raises(Qwen3AotError, match="stop strings need a tokenizer"):
        eng.generate([[5, 6, 7]], dataclasses.replace(GREEDY, stop=("x",)))
    c = eng.generate([[5, 6, 7]], GREEDY)[0]
    assert c.text == "" and c.output_tokens == 8


def test_generate_command_streams_the_greedy_text(runtime_artifact, engine, capsys):
    want = engine.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0))[0].text
    assert cli(["generate", str(runtime_artifact), PROMPT, "--max-tokens", "12"]) == 0
    assert capsys.readouterr().out == PROMPT + want + "\n"
    assert cli(["generate", str(runtime_artifact), PROMPT, "--max-tokens", "0"]) == 2
    assert "max_tokens" in capsys.readouterr().err
    assert cli(["generate", str(runtime_artifact / "nope"), PROMPT]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture
def hash_counts(monkeypatch, tmp_path):
    """Every weight file counts as large (hashed once per host), the hash cache in tmp_path;
    yields a dict: file name -> how many times it was hashed."""
    from qwen3_aot import manifest

    counts: dict[str, int] = {}
    real = manifest.sha256

    def counting(path):
        counts[path.name] = counts.get(path.name, 0) + 1
        return real(path)

    monkeypatch.setattr(manifest, "sha256", counting)
    monkeypatch.setattr(manifest, "HASH_AT_LOAD_MAX_BYTES", 1000)
    monkeypatch.setenv("QWEN3_AOT_CACHE_DIR", str(tmp_path / "cache"))
    return counts


def test_large_files_are_hashed_once_per_host(artifact_copy, hash_counts):
    from qwen3_aot import manifest

    manifest.read(artifact_copy)
    assert hash_counts["weights.safetensors"] == 1 and hash_counts["model.pt2"] == 1
    manifest.read(artifact_copy)
    assert hash_counts["weights.safetensors"] == 1  # the cache answered
    assert hash_counts["model.pt2"] == 2            # the graph is hashed at every load
    (artifact_copy / "weights.safetensors").touch()  # a new mtime: hashed again
    manifest.read(artifact_copy)
    assert hash_counts["weights.safetensors"] == 2


def test_an_unwritable_hash_cache_only_costs_a_hash(artifact_copy, hash_counts, monkeypatch, tmp_path):
    from qwen3_aot import manifest

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("QWEN3_AOT_CACHE_DIR", str(tmp_path / "a-file" / "cache"))  # cannot be created
    manifest.read(artifact_copy)
    manifest.read(artifact_copy)
    assert hash_counts["weights.safetensors"] == 2


def test_check_command_catches_a_damaged_weight_byte(artifact_copy, hash_counts, capsys):
    """Even with size and mtime kept, so that the hash cache (filled by the first check) still
    holds an entry for the file: check hashes every byte."""
    assert cli(["check", str(artifact_copy)]) == 0
    out = capsys.readouterr().out
    assert "weights.safetensors:" in out and "safetensors header" in out and "every file matches" in out
    weights = artifact_copy / "weights.safetensors"
    st = weights.stat()
    flip_byte(weights)  # inside the last tensor's data
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    assert cli(["check", str(artifact_copy)]) == 2
    assert "weights.safetensors does not match its checksum" in capsys.readouterr().err


def test_cli_version_and_ctrl_c(monkeypatch, capsys):
    import qwen3_aot
    import qwen3_aot.cli

    with pytest.raises(SystemExit) as done:
        cli(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"qwen3-aot {qwen3_aot.__version__}"

    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(qwen3_aot.cli, "_generate", interrupted)
    assert cli(["generate", "artifact", "prompt"]) == 130
    assert capsys.readouterr().err.strip() == "qwen3-aot: generate interrupted"  # one line, no traceback


def test_every_option_of_every_command_says_what_it_does_and_its_default():
    import argparse

    from qwen3_aot.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"export", "check", "generate", "serve"}
    for name, parser in commands.items():
        assert parser.description, name  # its own --help says what it does
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
            if action.option_strings and action.nargs != 0 and not action.required:  # takes a value
                assert "default" in action.help, (name, action.option_strings)
    shown = {name: " ".join(p.format_help().split()) for name, p in commands.items()}
    for name, said in [("generate", "most tokens to generate (default: 64)"),
                       ("generate", "sampling temperature, 0 for greedy (default: 0.0)"),
                       ("export", "KV-cache block size in tokens (default: 16)"),
                       ("serve", "TCP port (default: 8000)")]:
        assert said in shown[name]  # argparse filled the default in
