"""What the engines' tests compare with: prompts from the trained fixture's training text,
and transformers' greedy continuation of each (computed once per test run)."""

import functools

import torch
from tokenizers import Tokenizer

from suite_support import FIXTURE, text_prompts
from qwen3_aot.runtime import SamplingParams

MAX_NEW = 32
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0)


def prompts(n: int = 16) -> list[str]:
    """Slices of the training text, 3 to 95 tokens (`text_prompts`)."""
    return text_prompts([(s, 6 + 13 * k) for k, s in enumerate(range(1500, 59000, 59000 // n))][:n])


@functools.cache
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))


def decode(ids: list[int]) -> str:
    return tokenizer().decode(ids)


@functools.cache
def _hf_greedy() -> tuple[tuple[int, ...], ...]:
    from transformers import Qwen3ForCausalLM

    hf = Qwen3ForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()
    out = []
    for p in prompts():
        ids = tokenizer().encode(p).ids
        out.append(tuple(hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW)[0, len(ids):].tolist()))
    assert len(set(out)) == len(out)
    return tuple(out)


def hf_greedy() -> list[list[int]]:
    """transformers' greedy continuation of each prompt (stopping at eos, as ours does)."""
    return [list(o) for o in _hf_greedy()]
