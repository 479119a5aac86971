"""Chat templates rendered as transformers renders them, on Qwen3's real template and
tokenizer; our error for bad messages and failing templates; Qwen3's reasoning split from
the answer, whole and streamed."""

import itertools
import json
import os
import shutil

import pytest

from qwen3_aot import Qwen3AotError
from qwen3_aot.runtime.text.chat_template import ChatTemplate
from qwen3_aot.runtime.text.reasoning import ReasoningSplitter, opens_reasoning, split_reasoning
from qwen3_aot.runtime.text.tokenizer import Tokenizer
from qwen3_aot.runtime.text.detokenizer import Detokenizer

SYSTEM_USER = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}]
MULTI_TURN = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3? 用中文回答 🙂"},
]
AFTER_LAST_QUERY = [  # an assistant turn after the last user query keeps its reasoning
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> & \"here\"",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CALLS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
]


@pytest.fixture(scope="module")
def hf_tokenizer(qwen_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_checkpoint)


def _aliases_reasoning(hf_tokenizer) -> bool:
    """Whether the installed transformers renders a message's `reasoning` as `reasoning_content`
    (as ours does, after the transformers CI installs)."""
    probe = [{"role": "assistant", "content": "", "reasoning": "r"}]
    return hf_tokenizer.apply_chat_template(probe, chat_template="{{ messages[0].reasoning_content }}",
                                            tokenize=False) == "r"


@pytest.fixture(scope="module")
def template(qwen_checkpoint) -> ChatTemplate:
    return ChatTemplate.from_dir(qwen_checkpoint)


@pytest.mark.parametrize("messages, kwargs", [
    (SYSTEM_USER, {}),
    (SYSTEM_USER, {"enable_thinking": False}),
    (MULTI_TURN, {"enable_thinking": True}),
    (MULTI_TURN, {"enable_thinking": False}),
    (MULTI_TURN, {"add_generation_prompt": False}),
    (AFTER_LAST_QUERY, {"add_generation_prompt": False}),
    ([AFTER_LAST_QUERY[0], {"role": "assistant", "content": "Hello!", "reasoning": "older name"}], {}),
    (TOOL_CALLS, {"tools": [WEATHER_TOOL]}),
    (SYSTEM_USER, {"tools": [WEATHER_TOOL], "enable_thinking": False}),
], ids=["system-user", "system-user-nothink", "multi-turn-think", "multi-turn-nothink", "multi-turn-no-prompt",
        "reasoning-content", "reasoning-alias", "tool-calls", "tools-with-system"])
def test_render_equals_transformers(template, hf_tokenizer, messages, kwargs):
    add = kwargs.pop("add_generation_prompt", True)
    if any("reasoning" in m for m in messages) and not _aliases_reasoning(hf_tokenizer):
        pytest.skip("this transformers does not copy `reasoning` into `reasoning_content` yet (5.17 did not)")
    want = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add, **kwargs)
    assert template.render(messages, add_generation_prompt=add, **kwargs) == want


def test_qwen3_template_reads_enable_thinking(template):
    thinking, plain = (template.render(SYSTEM_USER, enable_thinking=v) for v in (True, False))
    assert thinking.endswith("<|im_start|>assistant\n")
    assert plain == thinking + "<think>\n\n</think>\n\n"
    # history: the earlier turn's reasoning is dropped, its answer kept
    assert "Add them" not in template.render(MULTI_TURN) and "<|im_start|>assistant\n4<|im_end|>" in template.render(MULTI_TURN)


def test_special_tokens_are_those_transformers_passes(template, hf_tokenizer):
    assert template.special_tokens == hf_tokenizer.special_tokens_map == {"eos_token": "<|im_end|>",
                                                                          "pad_token": "<|endoftext|>"}


# what transformers' environment adds: raise_exception, strftime_now, its tojson (no HTML
# escaping, indent), loop controls, namespace, dict, and the special tokens as variables
FEATURES = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
            "{% set ns.n = ns.n + 1 %}{{ eos_token }}{{ m | tojson }}\n{% if loop.index > 5 %}{% break %}{% endif %}"
            "{% endfor %}{{ ns.n }}{{ dict(a=1) | tojson(indent=2) }}{{ strftime_now('%Y') }}"
            "{{ tools is defined }}{{ documents is none }}{% if tools %}{{ tools | tojson }}{% endif %}{% if documents %}{{ documents[0].title }}{% endif %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# whitespace as transformers' trim_blocks and lstrip_blocks leave it
LAYOUT = """{% for m in messages %}
    {% if m.role != 'system' %}
<{{ m.role }}>
  {{ m.content }}
    {% endif %}
{% endfor %}
"""


@pytest.mark.parametrize("source, kwargs", [
    (FEATURES, {}),
    (FEATURES, {"tools": [WEATHER_TOOL], "documents": [{"title": "T", "text": "x"}]}),
    (FEATURES, {"eos_token": "<override>"}),
    (LAYOUT, {}),
], ids=["features", "tools-documents", "kwarg-over-special-token", "layout"])
def test_environment_equals_transformers(hf_tokenizer, template, source, kwargs):
    messages = MULTI_TURN + [{"role": "system", "content": "<b>&</b> ü"}]
    want = hf_tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                            add_generation_prompt=True, **kwargs)
    assert ChatTemplate(source, template.special_tokens).render(messages, **kwargs) == want
    assert "<b>&</b> ü" not in want  # the system message was skipped


def test_tojson_keeps_html_and_unicode():
    out = ChatTemplate("{{ messages[0] | tojson }}").render([{"role": "user", "content": "<b>&</b> 日本"}])
    assert out == json.dumps({"role": "user", "content": "<b>&</b> 日本"}, ensure_ascii=False)


def test_jinja_file_wins_over_tokenizer_config(tmp_path, qwen_tokenizer_json):
    from transformers import AutoTokenizer

    os.symlink(qwen_tokenizer_json, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "config {{ messages[0].content }}",
                                                                "bos_token": "<|endoftext|>"}))
    (tmp_path / "chat_template.jinja").write_text("jinja {{ bos_token }}{{ messages[0].content }}")
    ours = ChatTemplate.from_dir(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    assert ours.source == hf.chat_template
    assert ours.render(messages) == hf.apply_chat_template(messages, tokenize=False) == "jinja <|endoftext|>hi"


def test_named_templates_take_default(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain {{ messages|length }}"}]}))
    assert ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "x"}]) == "plain 1"


def test_no_template_gives_none(tmp_path):
    from suite_support import FIXTURE  # its tokenizer_config.json has no chat_template

    assert ChatTemplate.from_dir(FIXTURE) is None
    assert ChatTemplate.from_dir(tmp_path) is None


@pytest.mark.parametrize("messages, says", [
    ({"role": "user", "content": "hi"}, "got dict"),
    ("hi", "got str"),
    ([], "non-empty"),
    ([{"role": "user", "content": "hi"}, "oops"], "message 1 is str"),
    ([{"content": "hi"}], "message 0 has role None"),
    ([{"role": 1, "content": "hi"}], "has role 1"),
    ([{"role": "user"}], r"message 0 \(user\) has content None"),
    ([{"role": "user", "content": None}], r"message 0 \(user\) has content None"),
    ([{"role": "user", "content": 5}], "has content 5"),
])
def test_bad_messages_are_refused(template, messages, says):
    with pytest.raises(Qwen3AotError, match=says) as e:
        template.render(messages)
    assert "{'role': 'user', 'content': 'hi'}" in str(e.value)  # the error shows what is expected


@pytest.mark.parametrize("messages, kwargs", [
    ([{"role": "user", "content": "hi", "meta": object()}], {}),
    ([{"role": "user", "content": "hi", "meta": {1: "x"}}], {}),
    ([{"role": "user", "content": "hi", "meta": float("nan")}], {}),
    (SYSTEM_USER, {"tools": [lambda city: city]}),
])
def test_values_the_template_sees_must_be_json(template, messages, kwargs):
    with pytest.raises(Qwen3AotError, match="JSON values"):
        template.render(messages, **kwargs)


@pytest.mark.parametrize("source, says", [
    ("{% if messages|length > 1 %}{{ raise_exception('one message only, please') }}{% endif %}",
     "refused these messages: one message only, please"),
    ("{{ messages[0].content.__class__.__mro__ }}", "unsafe"),  # the sandbox
    ("{{ messages.append(1) }}", "unsafe"),  # immutable
    ("{% set ns = namespace() %}{% set ns._x = 1 %}", "may not set '_x'"),
    ("{{ messages[0].nope.deeper }}", "refused these messages: .*nope"),
    ("{{ messages[0].content + 5 }}", "failed on these messages"),
    ("{% for m in messages %}", "does not compile"),
])
def test_template_errors_are_ours(source, says):
    with pytest.raises(Qwen3AotError, match=says):
        ChatTemplate(source).render(SYSTEM_USER)


def test_tool_call_without_content_needs_a_template_that_handles_it():
    strict = ChatTemplate("{% for m in messages %}{{ m.role + ': ' + m.content }}{% endfor %}")
    with pytest.raises(Qwen3AotError, match="refused these messages"):
        strict.render(TOOL_CALLS)


# --- reasoning ------------------------------------------------------------------------------

CASES = [  # (text, in_reasoning, reasoning, answer)
    ("<think>\nAdd them.\n</think>\n\n4", False, "Add them.", "4"),  # Qwen3, enable_thinking=True
    ("4", False, None, "4"),  # enable_thinking=False: the template closed an empty block
    ("\n\n<think>\n\na\n\nb\n\n</think>\n\n\nc\n", False, "a\n\nb", "c\n"),  # only the tags' newlines go
    ("<think>\n\n</think>\n\nok", False, "", "ok"),  # an empty think block is reasoning ""
    ("<think>\nstill thinking when max_tokens hit", False, "still thinking when max_tokens hit", ""),
    ("<think>\npartial tag at the end </thi", False, "partial tag at the end </thi", ""),
    ("Use <think> tags like <think>x</think>.", False, None, "Use <think> tags like <think>x</think>."),
    ("  leading spaces, no block", False, None, "  leading spaces, no block"),
    ("<thi", False, None, "<thi"),
    ("plan</think>\n\nanswer", True, "plan", "answer"),  # the template opened the block (Thinking-2507)
    ("<think>plan</think>answer", True, "plan", "answer"),  # and the model opened it again
    ("plan, unfinished", True, "plan, unfinished", ""),
    ("plan</think>\n\nanswer", False, None, "plan</think>\n\nanswer"),  # no open block: text
    ("<think>a</think>b</think>c", False, "a", "b</think>c"),  # only the first block
    ("<think>思考 🤔\n</think>\n\n答案 ✅", False, "思考 🤔", "答案 ✅"),
]


@pytest.mark.parametrize("text, in_reasoning, reasoning, answer", CASES)
def test_split_reasoning(text, in_reasoning, reasoning, answer):
    assert split_reasoning(text, in_reasoning=in_reasoning) == (reasoning, answer)


def streamed(pieces: list[str], in_reasoning: bool) -> tuple[str | None, str]:
    stream, reasoning, answer = ReasoningSplitter(in_reasoning=in_reasoning), "", ""
    for r, a in [stream.push(p) for p in pieces] + [stream.finish()]:
        reasoning, answer = reasoning + r, answer + a
    return (reasoning if stream.has_reasoning else None), answer


@pytest.mark.parametrize("text, in_reasoning, reasoning, answer", CASES)
def test_stream_split_anywhere_joins_to_the_whole(text, in_reasoning, reasoning, answer):
    # one cut at every position, two cuts at every pair (tags and newline runs cut everywhere)
    cuts = [(i,) for i in range(len(text) + 1)] + list(itertools.combinations(range(1, len(text)), 2))
    for cut in cuts:
        pieces = [text[a:b] for a, b in zip((0, *cut), (*cut, len(text)))]
        assert streamed(pieces, in_reasoning) == (reasoning, answer), pieces


def test_stream_holds_back_only_what_could_still_be_a_tag():
    stream = ReasoningSplitter()
    assert "".join(stream.push(ch)[0] for ch in "<think>\nstep one</") == "step one"
    assert stream.push("x") == ("</x", "")


def test_opens_reasoning():
    assert opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not opens_reasoning("<|im_start|>assistant\n")


def test_reasoning_of_real_tokens_streamed_through_text_stream(qwen_checkpoint):
    tok = Tokenizer.from_dir(qwen_checkpoint)
    text = "<think>\n用户问 2+2，答案是 4 🤔。\n</think>\n\n答案：4 ✅"
    ids = tok.encode(text)
    assert 151667 in ids and 151668 in ids  # <think> and </think> are single tokens ...
    assert tok.decode(ids) == text  # ... that decoding keeps (added tokens with special=False)
    ts, pieces = Detokenizer(tok), []
    for t in ids:
        ts.push(t)
        pieces.append(ts.release())
    ts.flush()
    pieces.append(ts.release(final=True))
    assert streamed(pieces, False) == split_reasoning(text) == ("用户问 2+2，答案是 4 🤔。", "答案：4 ✅")


@pytest.mark.xdist_group("qwen_artifact")  # on the worker that builds it for the other tests
def test_export_carries_the_template_and_tokenizer_files(qwen_checkpoint, qwen_artifact, hf_tokenizer):
    from qwen_checkpoint import QWEN3_CHAT_TEMPLATE

    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (qwen_artifact / name).read_bytes() == (qwen_checkpoint / name).read_bytes(), name
    template = ChatTemplate.from_dir(qwen_artifact)
    assert template.source == QWEN3_CHAT_TEMPLATE.read_text(encoding="utf-8")
    tok = Tokenizer.from_dir(qwen_artifact)
    assert tok.eos_token_ids == (151645, 151643)
    want = hf_tokenizer.apply_chat_template(MULTI_TURN, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.encode(template.render(MULTI_TURN)) == list(want)


def test_export_copies_chat_template_jinja(tmp_path):
    from suite_support import FIXTURE
    from qwen3_aot.build import export

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(FIXTURE, checkpoint)
    (checkpoint / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}")
    # ONNX alone: the package stage copies the tokenizer files whatever the format, and ONNX is
    # the quicker export (no AOTInductor compile)
    artifact = export(checkpoint, tmp_path / "artifact", device="cpu", dtype="float32", check=False,
                               formats=("onnx",), log=lambda _msg: None)
    assert (artifact / "chat_template.jinja").read_bytes() == (checkpoint / "chat_template.jinja").read_bytes()
    assert ChatTemplate.from_dir(artifact).render(SYSTEM_USER) == "[system] You are terse.[user] 2+2?"
