"""The grammar that forces Qwen3's answer to be tool calls (tool_choice "required" or a named
function): hermes `<tool_call>` blocks whose arguments match the tools' parameter schemas."""

from __future__ import annotations

import json
import re

from qwen3_aot.runtime.core.grammar import parsed_grammar, xgrammar_module
from qwen3_aot.runtime.core.structured_output import StructuredOutput
from qwen3_aot.runtime.text.tool_calls import CALL_CLOSE, CALL_OPEN


def tool_call_constraint(tools: list[dict], choice: str, reasoning: bool = False) -> StructuredOutput:
    """The grammar of Qwen3's answer when a call is required: one or more `<tool_call>` blocks
    (choice "required"), or exactly one call of the named function, whose arguments match
    that tool's parameters schema (compact JSON)."""
    xgr = xgrammar_module()
    calls = []
    for tool in tools:
        fn = tool["function"]
        if choice != "required" and fn["name"] != choice:
            continue
        schema = fn.get("parameters") or {"type": "object", "additionalProperties": True}
        args = parsed_grammar("json", lambda: xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False))
        head = xgr.Grammar.from_ebnf("root ::= " + json.dumps(
            CALL_OPEN + '\n{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + ', "arguments": ',
            ensure_ascii=False))
        calls.append(xgr.Grammar.concat(head, args, xgr.Grammar.from_ebnf('root ::= "}\\n' + CALL_CLOSE + '"')))
    one = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
    if choice != "required":
        return StructuredOutput(grammar=str(one), reasoning=reasoning)
    # rename the call's root so that the whole may repeat it
    text = _renamed_root(str(one), "tool_call_block")
    return StructuredOutput(grammar=text + '\nroot ::= tool_call_block ("\\n" tool_call_block)*\n',
                            reasoning=reasoning)


def _renamed_root(ebnf: str, name: str) -> str:
    return re.sub(r"(?<![\w.])root(?![\w])", name, ebnf)
