"""Tool calls on `/v1/chat/completions`: how a request uses its tools, and what a forced call
must look like.

`tool_choice: "required"` and a named function are grammar-enforced (engine/grammar.py): the
model writes a JSON array of `{"name", "arguments"}` (required) or the named function's
arguments (named), each validated by the tools' own parameter schemas. `auto` lets the model
write what its chat template taught it; `deployments.tool_stream` reads the calls out of the
text, streamed or whole: Hermes/Qwen `<tool_call>{...}</tool_call>` blocks and Llama-3.x bare
JSON (`{"name": ..., "parameters": ...}`, optionally after `<|python_tag|>`, several joined by
`;`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, Literal

ToolMode = Literal["auto", "required", "named"]


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
