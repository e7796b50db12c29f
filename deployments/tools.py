"""Tool calls on `/v1/chat/completions`: what a forced call must look like, and how calls are
found in a model's free text.

`tool_choice: "required"` and a named function are grammar-enforced (engine/grammar.py): the
model writes a JSON array of `{"name", "arguments"}` (required) or the named function's
arguments (named), each validated by the tools' own parameter schemas. `auto` lets the model
write what its chat template taught it, and `parse_tool_calls` reads the two common formats:
Hermes/Qwen `<tool_call>{...}</tool_call>` blocks and Llama-3.x bare JSON
(`{"name": ..., "parameters": ...}`, optionally after `<|python_tag|>`, several joined by `;`).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

ToolMode = Literal["auto", "required", "named"]

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolPlan:
    """How one request uses its tools: the mode, and for `named` the function."""

    mode: ToolMode
    function: str | None = None


def tool_plan(tools: list[dict[str, Any]], choice: str | dict[str, Any] | None) -> ToolPlan:
    """The plan for `tools` under `tool_choice` (raises ValueError for a choice naming no tool)."""
    names = [function_of(t)["name"] for t in tools]
    if choice in (None, "auto"):
        return ToolPlan("auto")
    if choice == "required":
        return ToolPlan("required")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools {names}")
        return ToolPlan("named", name)
    raise ValueError(
        f"tool_choice must be none, auto, required or a named function, got {choice!r}"
    )


def function_of(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's function definition (name, description, parameters), checked."""
    if tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
        raise ValueError("tools: each tool is {'type': 'function', 'function': {...}}")
    function = tool["function"]
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError("tools: each tool's function needs a name")
    return function


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def forced_schema(
    tools: list[dict[str, Any]], plan: ToolPlan, parallel: bool = True
) -> dict[str, Any]:
    """The JSON schema a forced answer follows (`required` or `named`); without `parallel`
    (`parallel_tool_calls: false`) a required answer makes exactly one call."""
    functions = [function_of(t) for t in tools]
    if plan.mode == "named":
        return _parameters(next(f for f in functions if f["name"] == plan.function))
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": _parameters(f)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    return schema | ({} if parallel else {"maxItems": 1})


def tool_call(name: str, arguments: Any) -> dict[str, Any]:
    """One OpenAI tool call; `arguments` as the JSON text OpenAI returns."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": name, "arguments": text},
    }


def forced_calls(text: str, plan: ToolPlan) -> list[dict[str, Any]]:
    """The calls of a grammar-forced answer."""
    if plan.mode == "named":
        assert plan.function is not None
        return [tool_call(plan.function, text)]
    return [tool_call(c["name"], c["arguments"]) for c in json.loads(text)]


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content left around the calls, or None; the calls) in a model's free text."""
    if "<tool_call>" in text:
        calls = []
        for block in _HERMES.findall(text):
            call = _call_of(block)
            if call is None:
                return text, []  # a malformed call: leave the text as the model wrote it
            calls.append(call)
        content = text[: text.index("<tool_call>")].strip()
        return content or None, calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if body.startswith("{"):
        calls = [_call_of(part) for part in body.split(";")]
        if calls and all(c is not None for c in calls):
            return None, calls  # type: ignore[return-value]
    return text, []


def _call_of(block: str) -> dict[str, Any] | None:
    try:
        value = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return tool_call(value["name"], arguments)


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """A history message as chat templates read it: tool calls' arguments as objects (the
    templates `tojson` them), tool results with their call id."""
    out = {k: v for k, v in message.items() if v is not None}
    calls = []
    for call in message.get("tool_calls") or []:
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            with contextlib.suppress(json.JSONDecodeError):
                function["arguments"] = json.loads(arguments)
        calls.append({**call, "function": function})
    if calls:
        out["tool_calls"] = calls
    return out
