"""Tool calls in a model's text (deployments.tool_stream): the formats chat templates teach,
and the forced ones, read whole or streamed piece by piece as OpenAI streams them."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import pytest

from deployments.tool_stream import CallScanner, ToolCallStream, complete_calls
from deployments.tools import ToolPlan, forced_schema, tool_plan

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
AUTO, REQUIRED, NAMED = ToolPlan("auto"), ToolPlan("required"), ToolPlan("named", "f")


def named_arguments(calls: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_hermes_blocks_become_calls_and_the_text_before_them_content() -> None:
    text = 'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
    text += '<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    content, calls, finish = complete_calls(AUTO, text, "stop")
    assert content == "Let me look." and finish == "tool_calls"
    assert named_arguments(calls) == [("f", {"x": 1}), ("g", {})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2


def test_llama_json_calls_with_parameters_and_python_tag() -> None:
    content, calls, _ = complete_calls(
        AUTO, '<|python_tag|>{"name": "f", "parameters": {"a": "b"}}', "stop"
    )
    assert content is None and named_arguments(calls) == [("f", {"a": "b"})]
    _, two, _ = complete_calls(
        AUTO, '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {}}', "stop"
    )
    assert [c["function"]["name"] for c in two] == ["f", "g"]


def test_text_without_a_well_formed_call_stays_text() -> None:
    for text in (
        "plain answer",
        "{not json",
        '<tool_call>{"nam": 1}</tool_call>',
        '{"a": 1}',
        '<tool_call>{"name": "f", "arguments": {"x": }</tool_call>',
        "a < b, and <tool_ is no tag",
    ):
        assert complete_calls(AUTO, text, "stop") == (text, [], "stop")


def test_forced_schemas_and_calls() -> None:
    required = tool_plan([TOOL], "required")
    schema = forced_schema([TOOL], required, parallel=False)
    assert schema["maxItems"] == 1 and schema["items"]["anyOf"][0]["properties"]["name"]
    _, [call], finish = complete_calls(required, '[{"name": "f", "arguments": {"x": 2}}]', "stop")
    assert json.loads(call["function"]["arguments"]) == {"x": 2} and finish == "tool_calls"
    named = tool_plan([TOOL], {"type": "function", "function": {"name": "f"}})
    assert named == NAMED and forced_schema([TOOL], named) == {"type": "object"}
    assert complete_calls(named, '{"y": 3}', "stop")[1][0]["function"]["arguments"] == '{"y": 3}'


def test_a_forced_call_cut_short_keeps_its_partial_arguments_and_finishes_with_length() -> None:
    content, [call], finish = complete_calls(NAMED, '{"city": "Par', "length")
    assert content is None and finish == "length"
    assert call["function"] == {"name": "f", "arguments": '{"city": "Par'}


# -- streamed ------------------------------------------------------------------------------------


def streamed(plan: ToolPlan, text: str, pieces: list[int], finish: str = "stop") -> dict[str, Any]:
    """Feeds `text` cut at `pieces`, as the client would see it: the content, each call put
    together from its deltas, the finish reason, and how many deltas carried arguments."""
    stream, content, calls, argument_deltas = ToolCallStream(plan), "", {}, 0
    cuts = [0, *sorted(pieces), len(text)]
    answer_finish = None
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        last = i == len(cuts) - 2
        delta, answer_finish = stream.take(text[a:b], finish if last else None)
        content += delta.content
        for d in delta.tool_calls:
            call = calls.setdefault(d["index"], {"name": None, "arguments": "", "id": None})
            if "id" in d:
                assert call["id"] is None, "a call's header came twice"
                call["id"], call["name"] = d["id"], d["function"]["name"]
            assert call["id"] is not None, "arguments before the call's header"
            if d["function"].get("arguments"):
                argument_deltas += 1
                call["arguments"] += d["function"]["arguments"]
    return {
        "content": content,
        "calls": [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())],
        "finish": answer_finish,
        "argument_deltas": argument_deltas,
    }


CASES = [
    (AUTO, 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": [1, {"y": "}"}]}}\n</tool_call>'),
    (
        AUTO,
        '<tool_call>{"arguments": {"q": "a\\"b"}, "name": "g"}</tool_call><tool_call>{"name": "h", "arguments": {}}</tool_call>',
    ),
    (
        AUTO,
        '  <|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {"b": true}}',
    ),
    (
        REQUIRED,
        '[{"name": "f", "arguments": {"city": "Paris", "days": [1, 2]}}, {"name": "g", "arguments": {}}]',
    ),
    (NAMED, '{"city": "Paris", "nested": {"deep": [1, 2, 3]}}'),
]


@pytest.mark.parametrize(("plan", "text"), CASES)
def test_streamed_pieces_add_up_to_the_whole_answer_however_the_text_is_cut(
    plan: ToolPlan, text: str
) -> None:
    content, calls, finish = complete_calls(plan, text, "stop")
    whole = {"content": content or "", "calls": named_arguments(calls), "finish": finish}
    rng = random.Random(len(text))
    for trial in range(40):
        cuts = range(1, len(text)) if trial == 0 else rng.sample(range(1, len(text)), 6)
        seen = streamed(plan, text, list(cuts))
        assert seen["content"].strip() == whole["content"]
        assert seen["calls"] == whole["calls"] and seen["finish"] == whole["finish"] == "tool_calls"
    # Character by character, the arguments arrive in many deltas, not one at the end (those
    # written before the call's name wait for it).
    deltas = streamed(plan, text, list(range(1, len(text))))["argument_deltas"]
    assert deltas > (2 if text.startswith('<tool_call>{"arguments"') else 4 * len(calls))


def test_content_streams_at_once_and_only_what_may_open_a_tag_waits() -> None:
    stream = ToolCallStream(AUTO)
    assert stream.take("Hello")[0].content == "Hello"
    assert stream.take(" there <tool")[0].content == " there "  # "<tool" may open a tag
    assert stream.take("box>")[0].content == "<toolbox>"  # it did not
    delta, finish = stream.take("", "stop")
    assert delta.content == "" and not delta.tool_calls and finish == "stop"
    # An answer that opens like a Llama call but names none comes out as content at its end.
    braces = ToolCallStream(AUTO)
    assert braces.take('{"a": 1')[0].content == ""
    delta, finish = braces.take("}", "length")
    assert delta.content == '{"a": 1}' and finish == "length"


def test_the_scanner_reads_names_and_argument_spans_across_pieces() -> None:
    scanner = CallScanner(level=1)
    for piece in ['{"na', 'me": "f", "argu', 'ments": {"s": "}, {"', "}", ' , "x": 1}']:
        scanner.feed(piece)
    [call] = scanner.calls
    assert call.name == "f"
    assert scanner.arguments(call) == ('{"s": "}, {"}', True)
