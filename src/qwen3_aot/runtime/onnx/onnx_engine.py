"""The engine over an ONNX artifact: Engine's generate / stream API on onnxruntime.

Static batching, where Engine (over a pt2 artifact) batches continuously: generate() runs
its prompts in batches of up to max_batch_size, each prefilled together (left-padded) and
decoded in lockstep until every request in it has finished; a request that finishes early
takes no more tokens, but its row is computed to the end of the batch, and no request joins
a batch once it has started. stream() runs its prompt alone. There is no paged cache to
size: each batch's past/present tensors grow with it (OnnxForward).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Generator, Iterator

import torch

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.onnx.onnx_forward import OnnxForward
from qwen3_aot.runtime.core.request import Prompt, Request, make_request, pair_up
from qwen3_aot.runtime.core.penalties import TokenHistory
from qwen3_aot.runtime.core.grammar import GrammarMask, Grammars
from qwen3_aot.runtime.core.sampler import Sampler
from qwen3_aot.runtime.core.sampling_params import Completion, SamplingParams
from qwen3_aot.runtime.text.tokenizer import Tokenizer


class OnnxEngine:
    """Built by `qwen3_aot.runtime.load` for an ONNX artifact. Options: device (cuda with
    onnxruntime-gpu and a GPU, else cpu), max_batch_size (prompts run together, default 16)."""

    def __init__(self, artifact: Path, manifest: dict, device: str | torch.device | None = None, *,
                 max_batch_size: int = 16) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise Qwen3AotError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}.")
        self.forward = OnnxForward(artifact, manifest, device)
        self.device, self.max_batch_size = self.forward.device, max_batch_size
        self.config = manifest["model_config"]
        self.max_model_len = self.forward.max_positions
        self.tokenizer = Tokenizer.from_dir(artifact)
        self.sampler = Sampler(TokenHistory(self.config["vocab_size"], torch.device("cpu")))  # logits on the host
        self.grammars = Grammars(self.tokenizer, self.config["vocab_size"])  # structured outputs, built on first use
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Completions of one prompt (text or token ids) or a list of them, in order; one
        SamplingParams for all or one per prompt. All are checked before any is run."""
        requests = [self._request(p, s) for p, s in pair_up(prompts, sampling)]
        for start in range(0, len(requests), self.max_batch_size):
            for _ in self._run(requests[start:start + self.max_batch_size]):
                pass
        return [r.completion() for r in requests]

    def stream(self, prompt: Prompt, sampling: SamplingParams | None = None) -> Generator[str, None, Completion]:
        """Text pieces as they are generated (whole characters; text that could still become
        a stop string is held back); the generator's return value is the Completion. The
        prompt is checked now and runs from the first `next`; closing early cancels it."""
        return self._stream(self._request(prompt, sampling))

    def _stream(self, r: Request) -> Generator[str, None, Completion]:
        try:
            for _ in self._run([r]):
                piece = r.text.release(final=r.finished)
                if piece:
                    yield piece
            return r.completion()
        finally:
            if not r.finished:
                r.finish_reason = "abort"
            if r.history_slot is not None:
                self.sampler.history.release(r.history_slot)
                r.history_slot = None

    def _run(self, requests: list[Request]) -> Iterator[None]:
        """Prefill the batch, then a token for every unfinished request per step; yields after each."""
        logits, state = self.forward.prefill([r.seq.token_ids for r in requests])
        while True:
            rows = [i for i, r in enumerate(requests) if not r.finished]
            live = [requests[i] for i in rows]
            for r in live:
                if r.params.uses_history and r.history_slot is None:
                    r.history_slot = self.sampler.history.acquire(r.seq.token_ids)
            mask = GrammarMask([r.grammar for r in live]) if any(r.grammar is not None for r in live) else None
            out = self.sampler.sample(logits[rows], [r.params for r in live], [r.generator for r in live],
                                      [r.history_slot for r in live], mask)
            ids = out.ids.tolist()
            logprobs = None if out.logprobs is None else out.logprobs.tolist()
            top = None if out.top_ids is None else list(zip(out.top_ids.tolist(), out.top_logprobs.tolist()))
            for i, (r, token) in enumerate(zip(live, ids)):
                r.seq.token_ids.append(token)
                if r.accept_token(token, logprobs[i] if logprobs else None, top[i] if top else None) \
                        and r.history_slot is not None:
                    self.sampler.history.release(r.history_slot)
                    r.history_slot = None
            yield
            if all(r.finished for r in requests):
                return
            # finished rows feed their last token again: computed, never read
            logits, state = self.forward.extend(state, [[r.seq.token_ids[-1]] for r in requests])

    def _request(self, prompt: Prompt, params: SamplingParams | None) -> Request:
        limits = [(self.max_model_len, f"the positions the artifact was built for ({self.max_model_len}: the model's "
                                       "max_position_embeddings, or --max-model-len); shorten one of them, or rebuild "
                                       "with a larger --max-model-len (past the model's own context with YaRN: "
                                       "--rope-scaling, README's Long context)")]
        if params is not None and getattr(params, "prompt_logprobs", None) is not None:
            raise Qwen3AotError("prompt_logprobs need the pt2 engine; an ONNX artifact's engine does not compute "
                                "them. Leave prompt_logprobs out, or export with --format pt2.")
        # logits come back to the host: seeded generators live there
        return make_request(next(self._ids), prompt, params, self.tokenizer, self.config["vocab_size"], limits,
                            torch.device("cpu"), self.grammars)
