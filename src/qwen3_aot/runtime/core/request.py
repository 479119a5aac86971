"""A request's life, shared by both engines: checking a prompt and its parameters, then
taking its tokens one by one until eos, a stop token or string, or max_tokens."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.core import grammar as _grammar
from qwen3_aot.runtime.core.grammar import GrammarState, Grammars
from qwen3_aot.runtime.core.sampling_params import Completion, SamplingParams, _is_int
from qwen3_aot.runtime.core.scheduler import Sequence
from qwen3_aot.runtime.text.tokenizer import Tokenizer
from qwen3_aot.runtime.text.detokenizer import Detokenizer

Prompt = Union[str, list[int]]


class Request:
    """One prompt's life in an engine: its sequence, parameters, text and logprobs."""

    def __init__(self, seq: Sequence, params: SamplingParams, stop_ids: frozenset[int], text: Detokenizer,
                 generator: torch.Generator | None, grammar: GrammarState | None = None) -> None:
        self.seq, self.params, self.stop_ids, self.text, self.generator = seq, params, stop_ids, text, generator
        self.grammar = grammar  # structured outputs: the matcher, advanced with each token taken
        self.logprobs: list[float] | None = [] if params.logprobs is not None else None
        self.top_logprobs: list[dict[int, float]] | None = [] if params.logprobs else None
        self.history_slot: int | None = None  # the sampler's TokenHistory slot, for the penalties
        # prompt_logprobs: the first token has none; the engine core fills in the rest in chunks
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top_logprobs: list[dict[int, float] | None] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_top_logprobs = [None], [None]
            seq.logits_from = 1 if seq.num_prompt_tokens > 1 else None
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def tokens_left(self) -> int:
        """Output tokens it may still take before max_tokens ends it."""
        return self.params.max_tokens - self.seq.num_output_tokens

    def accept_token(self, token: int, logprob: float | None,
                     top: tuple[list[int], list[float]] | None = None) -> bool:
        """The sequence's newest token (already appended to it): its text, its logprob (and the
        batch's top alternatives, of which it keeps its own N) and the stop checks. True when it
        ends the request (finish_reason is then set)."""
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if self.top_logprobs is not None:
            n = self.params.logprobs
            self.top_logprobs.append({**dict(zip(top[0][:n], top[1][:n])), token: logprob})
        grammar_ended = self.grammar is not None and self.grammar.accept(token)
        if token in self.stop_ids:  # eos or a stop token: kept in token_ids, not in the text
            reason = "stop"
        elif self.text.push(token):
            reason = "stop"
        elif grammar_ended:  # the output is complete (eos, unless ignored, ended it above)
            reason = "stop"
        elif self.tokens_left == 0:
            reason = "length"
        else:
            return False
        if self.text.flush():
            reason = "stop"
        self.finish_reason = reason
        return True

    def completion(self) -> Completion:
        out = self.seq.output_ids
        return Completion(text=self.text.text, token_ids=out, finish_reason=self.finish_reason,
                          prompt_tokens=self.seq.num_prompt_tokens, output_tokens=len(out), logprobs=self.logprobs,
                          top_logprobs=self.top_logprobs, prompt_logprobs=self.prompt_logprobs,
                          prompt_top_logprobs=self.prompt_top_logprobs, cached_tokens=self.seq.num_cached_tokens or 0)


def request_limits(max_model_len: int, cache_capacity: int) -> list[tuple[int, str]]:
    """The limits a prompt + max_tokens must stay within, with what sets each and how to raise it."""
    return [(max_model_len, f"the artifact's max_model_len ({max_model_len}); shorten one of them, or rebuild the "
                            "artifact with a larger --max-model-len (past the model's own context with YaRN: "
                            "--rope-scaling, README's Long context)"),
            (cache_capacity, f"the KV cache ({cache_capacity} tokens); shorten them or load with a larger cache "
                             "(num_blocks, kv_cache_tokens or gpu_memory_utilization)")]


def make_request(seq_id: int, prompt: Prompt, params: SamplingParams | None, tokenizer: Tokenizer, vocab_size: int,
                 limits: list[tuple[int, str]], device: torch.device, grammars: Grammars | None = None) -> Request:
    """Check a prompt and its parameters (our error if bad) and make its request. `limits`:
    (most tokens, what sets it and how to raise it) that prompt + max_tokens must stay within.
    `grammars`: the engine's compiler of structured outputs; without one (an engine process's
    parent, whose requests are never sampled) a constraint is only checked."""
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise Qwen3AotError(f"sampling must be a SamplingParams, got {type(params).__name__}.")
    ids = prompt_ids(prompt, tokenizer)
    if not ids:
        raise Qwen3AotError("the prompt is empty; give at least one token.")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise Qwen3AotError(f"token ids must be in [0, {vocab_size}), got {min(ids)}..{max(ids)}.")
    for field, ids_given in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or ())):
        outside = [t for t in ids_given if not 0 <= t < vocab_size]
        if outside:
            raise Qwen3AotError(f"{field} token ids {outside} are outside the vocabulary [0, {vocab_size}).")
    total = len(ids) + params.max_tokens
    for most, what in limits:
        if total > most:
            raise Qwen3AotError(f"the prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds {what}.")
    if params.stop and not tokenizer.has_text:
        raise Qwen3AotError("stop strings need a tokenizer, and this artifact has no tokenizer.json; "
                            "use stop_token_ids.")
    stop_ids = frozenset(params.stop_token_ids) | frozenset(() if params.ignore_eos else tokenizer.eos_token_ids)
    generator = None
    if params.seed is not None and not params.greedy:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    grammar = None
    if params.structured is not None:  # compiled here, in the caller's thread, never the loop's
        if grammars is None:
            _grammar.check(params.structured)
        else:
            grammar = grammars.state(params.structured, ids)
    # prompt logprobs need every prompt position's logits: such a request computes its whole prompt
    reads_cache = params.prompt_logprobs is None
    return Request(Sequence(seq_id, ids, params.cache_salt, reads_cache), params, stop_ids,
                   Detokenizer(tokenizer, params.stop), generator, grammar)


def prompt_ids(prompt: object, tokenizer: Tokenizer) -> list[int]:
    """A prompt's token ids: text is encoded, token ids (ints, numpy's too) taken as they are."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt) if prompt else []
    if isinstance(prompt, np.ndarray) and prompt.ndim == 1 and np.issubdtype(prompt.dtype, np.integer):
        return prompt.tolist()
    # Plain ints (what JSON, pickle and tokenizers give) checked by their types in C: _is_int's
    # isinstance against numbers.Integral took 1.5 ms for a 3,000-token prompt, paid by the
    # server's worker thread and again by the engine process (which makes each request anew from
    # its ids), so a burst of 64 such requests reached the core a few at a time (issue 31).
    if isinstance(prompt, (list, tuple)) and set(map(type, prompt)) <= {int}:
        return list(prompt)
    if isinstance(prompt, (list, tuple)) and all(_is_int(t) for t in prompt):
        return [int(t) for t in prompt]
    if isinstance(prompt, dict) or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict)):
        raise Qwen3AotError("a prompt is a string or a list of token ids; chat messages ({'role': ..., "
                            "'content': ...}) go through chat(messages) or apply_chat_template(messages).")
    raise Qwen3AotError(f"a prompt is a string or a list of token ids (ints), got {type(prompt).__name__}"
                        f"{'' if not isinstance(prompt, (list, tuple)) else ' holding ' + type(prompt[0]).__name__}.")


def pair_up(prompts: Prompt | list[Prompt],
            sampling: SamplingParams | list[SamplingParams] | None) -> list[tuple[Prompt, SamplingParams | None]]:
    """generate()'s arguments as (prompt, params) pairs: one prompt or many, one
    SamplingParams for all or one per prompt. What is not a prompt is left for make_request
    to refuse with its reason."""
    if _is_one_prompt(prompts) or not isinstance(prompts, (list, tuple)):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise Qwen3AotError("no prompts given: pass a string, a list of token ids, or a list of those.")
    if isinstance(sampling, (list, tuple)):
        params = list(sampling)
        if len(params) != len(prompts):
            raise Qwen3AotError(f"{len(params)} SamplingParams for {len(prompts)} prompts; pass one, or one per "
                                "prompt.")
    else:
        params = [sampling] * len(prompts)
    return list(zip(prompts, params))


def _is_one_prompt(prompts: object) -> bool:
    return isinstance(prompts, (str, np.ndarray)) or (
        isinstance(prompts, (list, tuple)) and len(prompts) > 0 and all(_is_int(t) for t in prompts))
