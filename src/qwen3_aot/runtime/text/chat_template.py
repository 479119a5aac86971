"""Chat: the checkpoint's own template rendered as `transformers` renders it (Qwen3's
reasoning split from the answer is text/reasoning.py).

The template comes from chat_template.jinja or else from `chat_template` in
tokenizer_config.json: transformers' `from_pretrained` lets the .jinja file win when both
exist. It is rendered with jinja2's ImmutableSandboxedEnvironment, with the globals and
filters transformers gives templates (`raise_exception`, `strftime_now`, its `tojson`, a
`namespace` and `dict` that refuse dunder tricks), and with the named special tokens of
tokenizer_config.json (bos_token, eos_token, ...) as variables, as `apply_chat_template`
passes them. A template is code from the checkpoint: the sandbox keeps it from reaching
Python internals, which is why every value it sees is rebuilt from plain JSON types.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

from qwen3_aot.errors import Qwen3AotError

# The special tokens transformers passes to every template (SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")
# Older names of an assistant message's reasoning that transformers copies to reasoning_content
# (the one chat templates read) and to thinking (the one gpt-oss templates read).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplate:
    """A checkpoint's chat template and the special tokens it may reference."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_dir(cls, path: str | Path) -> "ChatTemplate | None":
        """The template of a checkpoint or artifact directory; None when it has none."""
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        try:
            config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        except json.JSONDecodeError as e:
            raise Qwen3AotError(f"{config_file} is not valid JSON ({e}); fix or remove it.") from None
        jinja_file = path / "chat_template.jinja"
        source = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else _default_template(
            config.get("chat_template"), config_file)
        return None if source is None else cls(source, _special_tokens(config))

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **template_kwargs: Any) -> str:
        """The prompt text for `messages`, as transformers' `apply_chat_template(messages,
        tokenize=False, add_generation_prompt=..., **template_kwargs)` gives it. `tools` and
        `documents` are passed as transformers passes them (None when not given); other
        keyword arguments (Qwen3 reads `enable_thinking`) become template variables."""
        import jinja2

        chat = _checked_messages(messages)
        variables = {"tools": None, "documents": None, **self.special_tokens,
                     **{k: _plain(v, k) for k, v in template_kwargs.items()}}
        try:
            return self._compiled.render(messages=chat, add_generation_prompt=bool(add_generation_prompt),
                                         **variables)
        except jinja2.TemplateError as e:  # raise_exception in the template, or an undefined name
            raise Qwen3AotError(f"the chat template refused these messages: {e.message or e}") from None
        except (TypeError, ValueError) as e:  # the template's own arithmetic on a message's values
            raise Qwen3AotError(f"the chat template failed on these messages: {e}") from None

    @cached_property
    def _compiled(self) -> Any:
        import jinja2

        try:
            return _environment().from_string(self.source)
        except jinja2.TemplateError as e:
            raise Qwen3AotError(f"the checkpoint's chat template does not compile: {e}; fix chat_template "
                                "in tokenizer_config.json (or chat_template.jinja).") from None


def _default_template(entry: Any, config_file: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, or named templates of which transformers
    takes "default" when no template name is asked for."""
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in entry):
        named = {t["name"]: t["template"] for t in entry}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise Qwen3AotError(f"chat_template in {config_file} is neither a template string nor named templates "
                        "with a 'default' one; give it one template string.")


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):  # an AddedToken as saved: {"content": ..., "__type": "AddedToken"}
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def _environment() -> Any:
    import jinja2
    import jinja2.ext
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # jinja's own tojson escapes HTML characters, which a prompt must keep as written
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class TemplateDict:
        """`dict` for templates: building a dict, with none of the type's attributes."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """`namespace` for templates: no underscore names, the way into Python internals."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's signature, so namespace(self=1) works
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env


def _checked_messages(messages: Any) -> list[dict[str, Any]]:
    """Plain copies of the messages, as the template will see them, or our error."""
    expected = ("messages are a non-empty list of dicts like {'role': 'user', 'content': 'hi'}: a string "
                "role, string content (None only for an assistant message that makes tool calls), and "
                "JSON values for other keys (tool_calls, reasoning_content, ...)")
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise Qwen3AotError(f"{expected}; got {type(messages).__name__} {_short(messages)}.")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise Qwen3AotError(f"{expected}; message {i} is {type(message).__name__} {_short(message)}.")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise Qwen3AotError(f"{expected}; message {i} has role {_short(role)}.")
        if not (isinstance(content, str) or (content is None and role == "assistant")):
            raise Qwen3AotError(f"{expected}; message {i} ({role}) has content {_short(content)}.")
        # transformers drops None values (APIs send content=None, templates handle a missing key)
        plain = _plain({k: v for k, v in message.items() if v is not None}, f"message {i} ({role})")
        reasoning = next((plain[k] for k in REASONING_FIELDS if k in plain), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        chat.append(plain)
    return chat


def _plain(value: Any, where: str) -> Any:
    """A copy of `value` in plain JSON types (subclasses of str, int, ... stripped to their base)."""
    if value is None or type(value) in (str, int, bool):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {str.__str__(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    raise Qwen3AotError(f"{where}: a chat template takes JSON values (str, number, bool, None, lists and "
                        f"dicts with string keys), not {type(value).__name__} {_short(value)}.")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
