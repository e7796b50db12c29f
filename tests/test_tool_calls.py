"""Finding tool calls in a model's text (deployments.tools): the formats chat templates teach."""

from __future__ import annotations

import json

from deployments.tools import ToolPlan, forced_calls, forced_schema, parse_tool_calls, tool_plan

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def test_hermes_blocks_become_calls_and_the_text_before_them_content() -> None:
    text = 'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
    text += '<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("f", {"x": 1}),
        ("g", {}),
    ]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)


def test_llama_json_calls_with_parameters_and_python_tag() -> None:
    content, calls = parse_tool_calls('<|python_tag|>{"name": "f", "parameters": {"a": "b"}}')
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"a": "b"}
    _, two = parse_tool_calls('{"name": "f", "parameters": {}}; {"name": "g", "parameters": {}}')
    assert [c["function"]["name"] for c in two] == ["f", "g"]


def test_text_without_a_well_formed_call_stays_text() -> None:
    for text in ("plain answer", "{not json", '<tool_call>{"nam": 1}</tool_call>', '{"a": 1}'):
        assert parse_tool_calls(text) == (text, [])


def test_forced_schemas_and_calls() -> None:
    required = tool_plan([TOOL], "required")
    schema = forced_schema([TOOL], required, parallel=False)
    assert schema["maxItems"] == 1 and schema["items"]["anyOf"][0]["properties"]["name"]
    [call] = forced_calls('[{"name": "f", "arguments": {"x": 2}}]', required)
    assert json.loads(call["function"]["arguments"]) == {"x": 2}
    named = tool_plan([TOOL], {"type": "function", "function": {"name": "f"}})
    assert named == ToolPlan("named", "f") and forced_schema([TOOL], named) == {"type": "object"}
    assert forced_calls('{"y": 3}', named)[0]["function"]["arguments"] == '{"y": 3}'
