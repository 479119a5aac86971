"""What structured outputs cost: output tok/s with no constrained row, half of the rows and
every row under a JSON schema (batch-64 decode and nano-vllm's workload), and the time from
request to first token with a schema compiled for the first time and with a cached one.

The model is the seeded random Qwen3-0.6B-shaped checkpoint (bench/random_checkpoint.py)
with Qwen's real tokenizer (xgrammar needs the vocabulary's texts): give --tokenizer DIR (a
folder with Qwen3's tokenizer.json and tokenizer_config.json) or --dashscope-wheel PATH (the
dashscope 2.0.2 wheel, from which tests/qwen_checkpoint.py rebuilds Qwen's tokenizer.json
with transformers; no network needed). The schema's answer cannot end before max_tokens (an
array of at least 256 objects), so every configuration makes the same tokens.

    python bench/grammar_bench.py --dashscope-wheel wheels/dashscope-2.0.2-py3-none-any.whl --json out.json
    python bench/grammar_bench.py --tiny --dashscope-wheel ...   # CPU smoke run, a tiny model

Also checks the overlap rule: steps holding constrained rows are queued ahead as free ones are
(only their sampling waits for the tokens in flight), where overlap happens (CUDA graphs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import random_checkpoint  # noqa: E402
from bench_support import sync, system_info  # noqa: E402
from workloads import TINY_PLAN, Plan, random_prompts, workload  # noqa: E402

from qwen3_aot import runtime  # noqa: E402
from qwen3_aot.runtime import SamplingParams  # noqa: E402
from qwen3_aot.runtime.core.structured_output import StructuredOutput  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EOS = [151645, 151643]
TINY_MODEL = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)


def long_schema(tag: str = "") -> dict:
    """Records in an array that cannot end early: at least 256 of them, each an id, a name
    and a kind (an enum), so the mask changes every few tokens as a real schema's does."""
    item = {"type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                                             "kind": {"enum": ["a", "b", "c"]}},
            "required": ["id", "name", "kind"]}
    return {"type": "object", "properties": {f"records{tag}": {"type": "array", "items": item, "minItems": 256}},
            "required": [f"records{tag}"]}


def tokenizer_files(args: argparse.Namespace, work: Path) -> Path:
    if args.tokenizer:
        return Path(args.tokenizer)
    sys.path.insert(0, str(REPO / "tests"))
    import qwen_checkpoint  # the test suite's recipe (needs transformers, which xgrammar depends on)

    out = work / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    qwen_checkpoint.write_qwen_tokenizer_json(Path(args.dashscope_wheel), out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(qwen_checkpoint.qwen3_tokenizer_config()))
    return out


def build(work: Path, tokenizer: Path, tiny: bool, device: str) -> Path:
    ckpt, art = work / "checkpoint", work / "artifact"
    dtype = "float32" if tiny else "bfloat16"
    random_checkpoint.write(ckpt, seed=0, dtype=dtype, bos_token_id=151643, eos_token_id=EOS,
                            **(TINY_MODEL if tiny else {}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, ckpt / name)
    limits = ["--max-num-tokens", "256", "--max-model-len", "1024"] if tiny else []
    subprocess.run([sys.executable, str(REPO / "scripts/export.py"), str(ckpt), "-o", str(art), "--device", device,
                    "--dtype", dtype, "--force", *limits], check=True)
    return art


def constrain(params: list[SamplingParams], every: int, schema: dict) -> list[SamplingParams]:
    """Every `every`-th request under the schema (0: none)."""
    so = StructuredOutput(json=schema)
    return [dataclasses.replace(p, structured=so) if every and i % every == 0 else p for i, p in enumerate(params)]


def run(core: runtime.EngineCore, prompts: list, params: list[SamplingParams]) -> dict:
    """Output tok/s; decode-only steps' time; steps queued ahead (overlap)."""
    records: list[runtime.StepRecord] = []
    core.observers.append(records.append)
    ahead = decode_s = 0.0
    steps = 0
    try:
        sync()
        t = time.perf_counter()
        requests = [core.add_request(p, s) for p, s in zip(prompts, params)]
        while core.has_unfinished():
            records.clear()
            t_step = time.perf_counter()
            core.step()
            steps += 1
            if records and all(r.kind == "decode" for r in records):
                decode_s += time.perf_counter() - t_step
            ahead += sum(r.ahead for r in records)
        sync()
        t = time.perf_counter() - t
    finally:
        core.observers.remove(records.append)
    done = [r.completion() for r in requests]
    tokens = sum(c.output_tokens for c in done)
    assert tokens == sum(p.max_tokens for p in params), "every configuration makes the same tokens"
    return {"tok_s": tokens / t, "seconds": t, "tokens": tokens, "steps": steps, "steps_ahead": int(ahead),
            "decode_only_s": decode_s, "masked_steps": core.masked_steps}


def configs(core: runtime.EngineCore, prompts: list, params: list[SamplingParams], schema: dict) -> dict:
    out = {}
    core.generate(prompts[:2], constrain(params[:2], 1, schema))  # compile the schema, warm every path
    for name, every in (("none", 0), ("half", 2), ("all", 1)):
        runs = []
        for _ in range(2):  # the faster of two: the first run of a configuration also warms what it uses
            before = core.masked_steps
            r = run(core, prompts, constrain(params, every, schema))
            r["masked_steps"] -= before
            runs.append(r)
        out[name] = max(runs, key=lambda r: r["tok_s"])
    # the overlap rule: a step holding a constrained row is queued ahead as a free one is (every
    # step of "all" holds one; the JSON records both counts); only its sampling waits
    if core.graphs is not None and core.overlap:
        assert out["all"]["steps_ahead"] > 0, out["all"]
    out["all_over_none"] = out["all"]["tok_s"] / out["none"]["tok_s"]
    out["half_over_none"] = out["half"]["tok_s"] / out["none"]["tok_s"]
    return out


def first_token_s(engine: runtime.Engine, prompt: list[int], params: SamplingParams) -> float:
    t = time.perf_counter()
    stream = engine.stream(prompt, params)
    try:
        for _ in stream:
            break
    finally:
        stream.close()
    return time.perf_counter() - t


def ttft(art: Path, vocab: int, repeats: int) -> dict:
    prompt = random_prompts(1, 128, min(vocab, 10000), seed=1)[0]
    free = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    with runtime.load(art, kv_cache_tokens=32768, prefix_caching=False) as engine:  # the same prompt each time
        engine.generate(prompt, free)
        t = time.perf_counter()
        engine.generate(prompt, dataclasses.replace(free, structured=StructuredOutput(json=long_schema("first"))))
        first = time.perf_counter() - t  # xgrammar's token table, then the schema
        schemas = [long_schema(uuid.uuid4().hex[:8]) for _ in range(repeats)]
        cold = [first_token_s(engine, prompt, dataclasses.replace(free, structured=StructuredOutput(json=s)))
                for s in schemas]
        cached = [first_token_s(engine, prompt, dataclasses.replace(free, structured=StructuredOutput(json=s)))
                  for s in schemas]
        unconstrained = [first_token_s(engine, prompt, free) for _ in range(repeats)]
    return {"first_constrained_request_s": first, "cold_schema_s": statistics.median(cold),
            "cached_schema_s": statistics.median(cached), "unconstrained_s": statistics.median(unconstrained)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokenizer", help="a folder with Qwen3's tokenizer.json and tokenizer_config.json")
    src.add_argument("--dashscope-wheel", help="dashscope-2.0.2-py3-none-any.whl, to rebuild Qwen's tokenizer from")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on CPU (smoke run)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--work", help="build here (default: a temporary folder)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    plan = TINY_PLAN if args.tiny else Plan()
    batch, prompt_len, new_tokens = (4, 16, 24) if args.tiny else (64, 512, 128)
    work = Path(args.work or tempfile.mkdtemp(prefix="grammar-bench-"))
    info = system_info(device)
    print(f"GPU {info['gpu']}, torch {info['torch']}, xgrammar {_xgrammar_version()}", flush=True)
    art = build(work, tokenizer_files(args, work), args.tiny, device)
    vocab = json.loads((art / "manifest.json").read_text())["model_config"]["vocab_size"]
    results = {"system": info, "xgrammar": _xgrammar_version(), "tiny": args.tiny,
               "ttft": ttft(art, vocab, 3 if args.tiny else 5)}
    core = runtime.load_core(art, prefix_caching=False)  # the same prompts run in each configuration
    schema = long_schema()
    prompts = random_prompts(batch, prompt_len, min(vocab, 10000), seed=0)
    params = [SamplingParams(max_tokens=new_tokens, temperature=0.6, seed=i, ignore_eos=True) for i in range(batch)]
    print(f"decode: batch {batch}, prompt {prompt_len}, {new_tokens} new tokens", flush=True)
    results["decode"] = configs(core, prompts, params, schema)
    wl_prompts, wl_params = workload(plan, vocab)
    print(f"nano-vllm workload: {plan.workload}", flush=True)
    results["workload"] = configs(core, wl_prompts, wl_params, schema)
    results["token_table_s"] = core.grammars.setup_seconds
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    t = results["ttft"]
    print(f"\n{'':28}{'none':>10}{'half':>10}{'all':>10}{'all/none':>10}")
    for name in ("decode", "workload"):
        r = results[name]
        print(f"{name + ' tok/s':28}{r['none']['tok_s']:10.0f}{r['half']['tok_s']:10.0f}{r['all']['tok_s']:10.0f}"
              f"{r['all_over_none']:10.2f}")
        print(f"{name + ' steps ahead':28}{r['none']['steps_ahead']:10d}{r['half']['steps_ahead']:10d}"
              f"{r['all']['steps_ahead']:10d}")
    print(f"first token: unconstrained {t['unconstrained_s'] * 1e3:.1f} ms, cached schema "
          f"{t['cached_schema_s'] * 1e3:.1f} ms, cold schema {t['cold_schema_s'] * 1e3:.1f} ms, first constrained "
          f"request (token table + schema) {t['first_constrained_request_s']:.2f} s")


def _xgrammar_version() -> str:
    from importlib.metadata import version

    return version("xgrammar")


if __name__ == "__main__":
    main()
