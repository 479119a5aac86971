"""Structured outputs on xgrammar: each constrained request's allowed next tokens.

One `Grammars` per engine holds xgrammar's token table (TokenizerInfo, built once from the
artifact's tokenizer, on the first constrained request: about 2 s for Qwen's 151k tokens) and
its GrammarCompiler, whose compiled grammars are cached by their text. Compiling happens in
the thread that makes the request (`EngineCore.make_request`; in an engine process, the
child's command thread), never in the loop thread: a request waits while its schema compiles
(vLLM's WAITING_FOR_FSM), the batch does not.

Each request's `GrammarState` (its matcher) is advanced by the loop thread with every token
the request takes (`Request.accept_token`), so it survives a preemption: the tokens already
taken stay taken. Each step, `mask_logits` fills the constrained rows' bitmask on the host from
their matchers and applies it to their logits on the device (-inf outside the allowed set);
a step without constrained rows does nothing here. The mask of a step needs the token of the
step before, so a step holding a constrained row that is queued ahead of that token (overlap)
has only its forward queued ahead: it is sampled once the token is taken, with masks from the
matchers it advanced (vLLM's order; `EngineCore.step`). A request that ended on that token
has no row left to mask, so a terminated matcher, whose mask xgrammar refuses to fill, is
never asked for one.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable

import torch

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.core.structured_output import StructuredOutput
from qwen3_aot.runtime.text.reasoning import THINK_CLOSE, THINK_OPEN

if TYPE_CHECKING:
    from qwen3_aot.runtime.text.tokenizer import Tokenizer

log = logging.getLogger("qwen3_aot")
CACHE_SIZE = 256  # compiled grammars kept, least recently used dropped first


def xgrammar_module() -> Any:
    """xgrammar, imported on first use (our error naming the extra when it is missing)."""
    try:
        import xgrammar
    except ImportError:
        raise Qwen3AotError("structured outputs and tool_choice 'required' or a named function need xgrammar: "
                            "pip install xgrammar (or qwen3-aot[grammar]).") from None
    return xgrammar


def check(structured: StructuredOutput) -> None:
    """Our error if the schema, pattern or grammar does not parse (no tokenizer needed: what an
    engine process's parent checks before the child compiles it)."""
    xgr = xgrammar_module()
    kind, text = structured.key
    parsed_grammar(kind, lambda: {"json": lambda: xgr.Grammar.from_json_schema(text, any_whitespace=False),
                           "json_object": lambda: xgr.Grammar.from_json_schema(_ANY_OBJECT, any_whitespace=False),
                           "regex": lambda: xgr.Grammar.from_regex(text),
                           "choice": lambda: xgr.Grammar.from_ebnf(_choice_ebnf(structured.choice)),
                           "grammar": lambda: xgr.Grammar.from_ebnf(text)}[kind]())


_ANY_OBJECT = json.dumps({"type": "object", "additionalProperties": True})


def _choice_ebnf(choices: tuple[str, ...]) -> str:
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def parsed_grammar(kind: str, make: Callable[[], Any]) -> Any:
    """`make()`, an xgrammar grammar of `kind`; what it cannot parse becomes our error naming the kind."""
    what = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex", "choice": "choice",
            "grammar": "grammar"}[kind]
    try:
        return make()
    except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's parse errors are RuntimeErrors
        message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise Qwen3AotError(f"the {what} cannot be used as a constraint: {_without_source(message)}") from None


def _without_source(message: str) -> str:
    """xgrammar's message without its '[time] /project/cpp/file.cc:123: ' prefix."""
    head, sep, rest = message.partition(": ")
    return rest if sep and ".cc:" in head else message


class Grammars:
    """An engine's grammar compiler (see the module docstring). Thread-safe."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.setup_seconds: float | None = None  # building the token table, once
        self.think_ids = (tokenizer.token_id(THINK_OPEN), tokenizer.token_id(THINK_CLOSE))

    def state(self, structured: StructuredOutput, prompt_ids: list[int]) -> GrammarState:
        """A fresh matcher for one request (compiling its grammar unless cached)."""
        xgr = xgrammar_module()
        return GrammarState(xgr.GrammarMatcher(self.compile(structured)), structured, prompt_ids, self.think_ids)

    def compile(self, structured: StructuredOutput) -> Any:
        key = structured.key
        with self._lock:
            compiler = self._compiler or self._build()
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        kind, text = key
        compiled = parsed_grammar(kind, lambda: {
            "json": lambda: compiler.compile_json_schema(text, any_whitespace=False),
            "json_object": lambda: compiler.compile_json_schema(_ANY_OBJECT, any_whitespace=False),
            "regex": lambda: compiler.compile_regex(text),
            "choice": lambda: compiler.compile_grammar(_choice_ebnf(structured.choice)),
            "grammar": lambda: compiler.compile_grammar(text)}[kind]())
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _build(self) -> Any:
        """xgrammar's token table and compiler (under the lock, once)."""
        xgr = xgrammar_module()
        backend = self._tokenizer.backend
        if backend is None:
            raise Qwen3AotError("structured outputs need the artifact's tokenizer.json, and this artifact has none; "
                                "rebuild it from a checkpoint with one.")
        start = time.perf_counter()
        vocab = [""] * self.vocab_size  # "" marks a token no grammar may produce
        for text, i in backend.get_vocab(with_added_tokens=True).items():
            if i < self.vocab_size:
                vocab[i] = text
        for i, token in backend.get_added_tokens_decoder().items():
            if token.special and i < self.vocab_size:
                vocab[i] = ""  # <|im_start|> and the like are control tokens, never text
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
        vocab_type = xgr.VocabType.BYTE_LEVEL if "ByteLevel" in kinds else \
            xgr.VocabType.BYTE_FALLBACK if "ByteFallback" in kinds else xgr.VocabType.RAW
        stop = list(self._tokenizer.eos_token_ids) or None
        info = xgr.TokenizerInfo(vocab, vocab_type, vocab_size=self.vocab_size, stop_token_ids=stop)
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self.setup_seconds = time.perf_counter() - start
        log.info("structured outputs: xgrammar's token table built in %.2fs", self.setup_seconds)
        return self._compiler


class GrammarState:
    """One request's place in its grammar. Phases: "think" (reasoning on, nothing generated
    yet: the grammar's first tokens or `<think>`), "reasoning" (free until `</think>`),
    "constrained", "done" (the grammar ended)."""

    def __init__(self, matcher: Any, structured: StructuredOutput, prompt_ids: list[int],
                 think_ids: tuple[int | None, int | None]) -> None:
        self.matcher = matcher
        self._open, self._close = think_ids
        self.phase = "constrained"
        if structured.reasoning and self._open is not None and self._close is not None:
            last_open = max((i for i, t in enumerate(prompt_ids) if t == self._open), default=-1)
            last_close = max((i for i, t in enumerate(prompt_ids) if t == self._close), default=-1)
            self.phase = "reasoning" if last_open > last_close else "think"

    @property
    def masks_next(self) -> bool:
        """Whether the next token is constrained (reasoning text is not)."""
        return self.phase in ("think", "constrained")

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)
        self.filled(bitmask, row)

    def filled(self, bitmask: torch.Tensor, row: int) -> None:
        """Once the matcher has filled its row: what the phase adds to it."""
        if self.phase == "think":  # the model may open a think block instead
            bitmask[row, self._open // 32] |= _bit(self._open % 32)

    def accept(self, token: int) -> bool:
        """Advance by the request's newest token; True once the grammar has ended."""
        if self.phase == "think" and token == self._open:
            self.phase = "reasoning"
        elif self.phase == "reasoning":
            if token == self._close:
                self.phase = "constrained"
        elif self.phase in ("think", "constrained"):
            self.phase = "constrained"
            if not self.matcher.accept_token(token):
                # the mask allowed only what the matcher accepts: this is a bug, not the model's doing
                log.error("structured outputs: the matcher refused token %d that its mask allowed", token)
                self.phase = "done"
            elif self.matcher.is_terminated():
                self.phase = "done"
        return self.phase == "done"


def _bit(i: int) -> int:
    """Bit i of an int32 word, as a Python int that fits int32."""
    return (1 << i) - (1 << 32) if i == 31 else 1 << i


_batch: Any = None  # xgrammar's BatchGrammarMatcher (a thread pool), made on first use


class GrammarMask:
    """The sampler's grammar stage (core/sampler.py's Constraint) for one batch: each row's
    grammar state, or None for a row without one. `masked`: whether `apply` masked any row."""

    def __init__(self, states: list[GrammarState | None]) -> None:
        self.states, self.masked = states, False

    def apply(self, logits: torch.Tensor) -> None:
        self.masked = bool(mask_logits(logits, self.states))


def mask_logits(logits: torch.Tensor, states: list[GrammarState | None]) -> list[int]:
    """Set to -inf, in place, each constrained row's logits outside what its grammar allows
    next; returns the rows masked (none: nothing was done)."""
    rows = [i for i, s in enumerate(states) if s is not None and s.masks_next]
    if not rows:
        return rows
    global _batch
    xgr = xgrammar_module()
    vocab = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(len(states), vocab)  # all allowed, -1 in every word
    if len(rows) == 1:
        states[rows[0]].matcher.fill_next_token_bitmask(bitmask, rows[0])
    else:  # xgrammar's C++ threads fill the rows at once
        _batch = _batch or xgr.BatchGrammarMatcher()
        _batch.batch_fill_next_token_bitmask([states[i].matcher for i in rows], bitmask, rows)
    for i in rows:
        states[i].filled(bitmask, i)
    if logits.device.type == "cuda":
        bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=rows)
    return rows
