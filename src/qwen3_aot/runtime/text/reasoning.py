"""Qwen3's reasoning (`<think>...</think>`) split from the answer, whole or piece by piece.

Reasoning, for Qwen3 (the rules of vLLM's qwen3 reasoning parser, with two choices of ours):
- Qwen3 with enable_thinking=True (its default) writes `<think>\\n...\\n</think>\\n\\n` and then
  the answer; with enable_thinking=False the template puts an empty think block in the prompt
  and the model writes only the answer. A think block counts only when it opens the output
  (after optional whitespace): a `<think>` later in an answer is text the model talks about.
- Templates that end the prompt inside a think block (Qwen3-Thinking-2507) leave only
  `</think>` in the output: pass `in_reasoning=True` (see `opens_reasoning(prompt)`).
- Output whose think block never closes (max_tokens reached while thinking) is all
  reasoning and no answer, as vLLM's parser does (giving it as content would hand a user
  half a chain of thought as the answer).
- The newlines Qwen3 writes around the tags are not part of the reasoning or the answer:
  they are stripped as Qwen3's template strips them when it renders reasoning_content back
  into a prompt, so a reply split here and sent back renders as the model wrote it.
Both tags are added tokens with special=False in Qwen3's tokenizer, so decoding with
skip_special_tokens=True keeps them in the text.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def opens_reasoning(prompt: str) -> bool:
    """Whether a rendered prompt ends inside a think block (its template wrote `<think>` for
    the model), so that the output starts as reasoning."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


def split_reasoning(text: str, *, in_reasoning: bool = False) -> tuple[str | None, str]:
    """(reasoning, answer) of a whole output; reasoning is None when there is no think block.
    `in_reasoning`: the prompt already opened the think block (`opens_reasoning`)."""
    head = text.lstrip()
    if head.startswith(THINK_OPEN):
        body = head[len(THINK_OPEN):]
    elif in_reasoning:
        body = text
    else:
        return None, text
    reasoning, closed, answer = body.partition(THINK_CLOSE)
    return reasoning.strip("\n"), answer.lstrip("\n") if closed else ""


class ReasoningSplitter:
    """`split_reasoning` for text that arrives in pieces: `push(piece)` and, at the end,
    `finish()` each give (reasoning_delta, answer_delta), and the deltas of a whole stream
    join to `split_reasoning` of the whole text. A piece that might still be the start of a
    tag (`<thi`), or newlines that a closing tag would strip, are held back until the next
    piece shows what they are. `has_reasoning` says whether a think block was found (the
    None of `split_reasoning`)."""

    def __init__(self, *, in_reasoning: bool = False) -> None:
        self._state = "start"  # start -> reasoning -> answer, or start -> answer
        self._held = ""  # text not yet given out
        self._started = False  # the current part (reasoning or answer) has given out text
        self.has_reasoning = in_reasoning

    def push(self, piece: str) -> tuple[str, str]:
        self._held += piece
        reasoning = ""
        if self._state == "start":
            head = self._held.lstrip()
            if head.startswith(THINK_OPEN):
                self._held, self._state, self.has_reasoning = head[len(THINK_OPEN):], "reasoning", True
            elif THINK_OPEN.startswith(head):
                return "", ""  # still only whitespace and the start of a tag
            else:
                self._state = "reasoning" if self.has_reasoning else "answer"
        if self._state == "reasoning":
            before, closed, after = self._held.partition(THINK_CLOSE)
            if not closed:
                keep = len(before) - _tail_to_hold(before)
                self._held = before[keep:]
                return self._lead(before[:keep]), ""
            reasoning = self._lead(before).rstrip("\n")
            self._held, self._state, self._started = after, "answer", False
        answer, self._held = self._lead(self._held), ""
        return reasoning, answer

    def finish(self) -> tuple[str, str]:
        """The end of the text: what was held back, as what it turned out to be."""
        held, self._held = self._held, ""
        if self.has_reasoning and self._state != "answer":
            self._state = "reasoning"
            return self._lead(held).rstrip("\n"), ""
        return "", held  # whitespace or a partial <think> that turned out to be the answer

    def _lead(self, text: str) -> str:
        """Give out `text`, without the newlines that open a reasoning or an answer after a tag."""
        if not self._started and (self._state != "answer" or self.has_reasoning):
            text = text.lstrip("\n")
        self._started = self._started or bool(text)
        return text


def _tail_to_hold(text: str) -> int:
    """How many characters at the end of reasoning text to hold back: a partial `</think>`
    and the newlines before it, which a closing tag would strip."""
    partial = next((n for n in range(min(len(text), len(THINK_CLOSE) - 1), 0, -1)
                    if THINK_CLOSE.startswith(text[-n:])), 0)
    return len(text) - len(text[:len(text) - partial].rstrip("\n"))


def may_think(prompt: str) -> bool:
    """Whether the model may think before answering this chat prompt (Qwen3's template): the
    prompt opens a think block, or its last turn has none closed (enable_thinking=False writes
    an empty `<think>\\n\\n</think>` there; with thinking on the model writes the block itself)."""
    return opens_reasoning(prompt) or THINK_CLOSE not in prompt[prompt.rfind("<|im_start|>"):]
