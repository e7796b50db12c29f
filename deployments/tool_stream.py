"""Tool calls streamed as the model writes them: a call's header (id, name) as soon as its name
is complete, then its arguments in fragments, as OpenAI streams them.

The calls are read with a small incremental JSON scanner rather than by parsing the text so
far on every chunk: it sees each character once and knows, for every call object, its name and
where its arguments' value starts and ends. What it streams is the arguments' text as the
model wrote it. A response that is not streamed reads its calls the same way, from the whole
text at once (`complete_calls`), so both give the same calls.

Where the calls are:
- `named`: the whole answer is the named function's arguments (grammar-enforced);
- `required`: the answer is a JSON array of `{"name", "arguments"}` objects (grammar-enforced);
- `auto`: the model's free text. Text streams as content until a Hermes `<tool_call>` tag, or
  an answer that opens with `{` or `<|python_tag|>` (Llama 3.x); text that may be the start of
  such a tag is held back until it is known. From there every top-level JSON object with a
  `name` is a call (`arguments`, or Llama's `parameters`). An answer that opened like a call
  but never named one is sent as content when it ends.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from deployments.tools import ToolPlan

_HERMES_TAG = "<tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class ScannedCall:
    """One call object as far as it has been read: offsets index the scanned text."""

    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None  # exclusive; None while the value is still being written


@dataclass
class CallScanner:
    """Finds call objects, the JSON objects that open at bracket depth `level`, in text that
    arrives in pieces; only the new characters of each `feed` are looked at."""

    level: int
    text: str = ""
    calls: list[ScannedCall] = field(default_factory=list)
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _string_start: int = 0
    _expect_key: bool = False
    _key: str | None = None

    def feed(self, piece: str) -> None:
        start = len(self.text)
        self.text += piece
        for i in range(start, len(self.text)):
            self._step(i, self.text[i])

    def _in_call(self) -> bool:
        return self._depth == self.level and bool(self.calls)

    def _reading_arguments(self) -> bool:
        return self._in_call() and not self._expect_key and self._key in _ARGUMENT_KEYS

    def _step(self, i: int, ch: str) -> None:
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self._in_string = False
                self._string_ended(i)
            return
        if ch == '"':
            self._in_string, self._string_start = True, i
            self._arguments_begin(i)
        elif ch in "{[":
            self._arguments_begin(i)
            self._depth += 1
            if self._depth == self.level and ch == "{":
                self.calls.append(ScannedCall())
                self._expect_key, self._key = True, None
        elif ch in "}]":
            if self._in_call():  # the call object itself closes
                self._end_scalar(i)
            self._depth -= 1
            if self._reading_arguments() and self.calls[-1].args_end is None:
                self.calls[-1].args_end = i + 1  # a nested value closed
        elif self._in_call():
            if ch == ",":
                self._end_scalar(i)
                self._expect_key, self._key = True, None
            elif ch != ":" and not ch.isspace():
                self._arguments_begin(i)  # a number, true, false or null

    def _arguments_begin(self, i: int) -> None:
        if self._reading_arguments() and self.calls[-1].args_start is None:
            self.calls[-1].args_start = i

    def _string_ended(self, i: int) -> None:
        if not self._in_call():
            return
        value = _json_string(self.text[self._string_start : i + 1])
        call = self.calls[-1]
        if self._expect_key:
            self._key, self._expect_key = value, False
        elif self._key == "name" and call.name is None:
            call.name = value
        elif self._key in _ARGUMENT_KEYS and call.args_end is None:
            call.args_end = i + 1

    def _end_scalar(self, i: int) -> None:
        call = self.calls[-1]
        if self._key in _ARGUMENT_KEYS and call.args_start is not None and call.args_end is None:
            call.args_end = i  # trailing spaces are trimmed where the text is read

    def arguments(self, call: ScannedCall) -> tuple[str, bool]:
        """(the call's arguments as written so far, whether they are complete)."""
        if call.args_start is None:
            return "", False
        if call.args_end is None:
            return self.text[call.args_start :], False
        return self.text[call.args_start : call.args_end].rstrip(), True


def _json_string(literal: str) -> str | None:
    try:
        value = json.loads(literal)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, str) else None


@dataclass
class _SentCall:
    id: str
    name: str
    arguments: str = ""  # what has been streamed of its arguments

    def as_call(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


@dataclass
class StreamedDelta:
    """What one piece of a choice's text adds to its stream."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class ToolCallStream:
    """One chat choice's text turned into content and tool-call deltas as it arrives."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self._content_sent = 0  # characters of `text` sent as content
        self._region: int | None = None  # where the calls begin in `text`, once known
        self._scanner: CallScanner | None = None
        self._sent: list[_SentCall] = []
        self._finish_reason: str | None = None  # the model's, once the last piece is in
        if plan.mode != "auto":
            self._start_calls(0)

    def take(
        self, piece: str, finish_reason: str | None = None
    ) -> tuple[StreamedDelta, str | None]:
        """What a piece of the text adds to the stream; on the last piece (the one with the
        model's finish reason), also what its end adds, and the answer's finish reason."""
        delta = self._feed(piece)
        if finish_reason is None:
            return delta, None
        last, finish = self._finish(finish_reason)
        calls = merged_deltas(delta.tool_calls + last.tool_calls)
        return StreamedDelta(delta.content + last.content, calls), finish

    def _feed(self, piece: str) -> StreamedDelta:
        self.text += piece
        delta = StreamedDelta()
        if self._region is None:
            delta.content = self._content_until_calls()
        if self._region is not None:
            if self._scanner is not None:
                self._scanner.feed(self.text[self._region + len(self._scanner.text) :])
            delta.tool_calls = self._call_deltas(final=False)
        return delta

    def whole(self) -> tuple[str | None, list[dict[str, Any]], str | None]:
        """The answer once its last piece is in, as a response that is not streamed gives it:
        (content, calls, finish reason). Free text (`auto`) whose calls do not all hold JSON
        arguments stays text, as the model wrote it."""
        calls = [c.as_call() for c in self._sent]
        malformed = self.plan.mode == "auto" and not all(_is_json(c.arguments) for c in self._sent)
        if not calls or malformed:
            return self.text, [], self._finish_reason
        content = self.text[: self._content_sent].strip() or None
        return content, calls, self._answer_finish(self._finish_reason)

    def _finish(self, finish_reason: str | None) -> tuple[StreamedDelta, str | None]:
        self._finish_reason = finish_reason
        delta = StreamedDelta(tool_calls=self._call_deltas(final=True))
        if not self._sent:  # no call after all: everything not yet sent is content
            delta.content = self.text[self._content_sent :]
            self._content_sent = len(self.text)
        return delta, self._answer_finish(finish_reason)

    def _answer_finish(self, finish_reason: str | None) -> str | None:
        return "tool_calls" if self._sent and finish_reason != "length" else finish_reason

    # -- auto: where do calls begin? -----------------------------------------------------------

    def _content_until_calls(self) -> str:
        text = self.text
        if self._content_sent == 0:  # a Llama call opens the answer, if anywhere
            stripped = text.lstrip()
            if stripped.startswith(("{", _PYTHON_TAG)):
                self._start_calls(len(text) - len(stripped))
                return ""
            if _PYTHON_TAG.startswith(stripped):  # nothing yet, or maybe the tag: wait
                return ""
        tag = text.find(_HERMES_TAG, self._content_sent)
        if tag >= 0:
            self._start_calls(tag)
            safe = tag
        else:
            safe = len(text) - _partial_tag_suffix(text, _HERMES_TAG)
        piece = text[self._content_sent : safe]
        self._content_sent = max(self._content_sent, safe)
        return piece

    def _start_calls(self, at: int) -> None:
        self._region = at
        if self.plan.mode != "named":
            self._scanner = CallScanner(level=2 if self.plan.mode == "required" else 1)

    # -- the calls -----------------------------------------------------------------------------

    def _call_deltas(self, final: bool) -> list[dict[str, Any]]:
        if self._region is None:
            return []
        if self._scanner is None:  # named: the whole text is the arguments
            assert self.plan.function is not None
            calls = [(self.plan.function, self.text, final)]
        else:
            calls = [(c.name, *self._scanner.arguments(c)) for c in self._scanner.calls if c.name]
        deltas = []
        for index, (name, arguments, complete) in enumerate(calls):
            if index == len(self._sent):
                self._sent.append(_SentCall(f"call_{secrets.token_hex(12)}", name))
                function = {"name": name, "arguments": ""}
                deltas.append(
                    {
                        "index": index,
                        "id": self._sent[index].id,
                        "type": "function",
                        "function": function,
                    }
                )
            piece = self._new_arguments(self._sent[index], arguments, complete or final)
            if piece:
                deltas.append({"index": index, "function": {"arguments": piece}})
        return merged_deltas(deltas)

    @staticmethod
    def _new_arguments(sent: _SentCall, arguments: str, complete: bool) -> str:
        if arguments.startswith('"'):  # arguments written as a JSON string: sent decoded, whole
            if not complete or sent.arguments:
                return ""
            decoded = _json_string(arguments)
            sent.arguments = decoded if decoded is not None else arguments
            return sent.arguments
        if not arguments.startswith(("{", "[")) and not complete:
            return ""  # a scalar: wait for all of it
        piece = arguments[len(sent.arguments) :]
        sent.arguments = arguments
        return piece


def _partial_tag_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def merged_deltas(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per call index in one delta: a header and its arguments travel together."""
    out: dict[int, dict[str, Any]] = {}
    for d in deltas:
        have = out.get(d["index"])
        if have is None:
            out[d["index"]] = {**d, "function": dict(d["function"])}
        else:
            have["function"]["arguments"] = (
                have["function"].get("arguments", "") + d["function"]["arguments"]
            )
    return list(out.values())


def complete_calls(
    plan: ToolPlan, text: str, finish_reason: str | None
) -> tuple[str | None, list[dict[str, Any]], str | None]:
    """A whole answer's (content, calls, finish reason), read the way the stream reads it."""
    stream = ToolCallStream(plan)
    stream._feed(text)
    stream._finish(finish_reason)
    return stream.whole()


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True
