"""One API response assembled from its choices' token streams.

A request becomes one internal request per choice (n per prompt), each streamed by decode on
its own; this gathers their chunks by choice index into the OpenAI shapes: whole responses,
or the streaming deltas with each choice's logprobs beside its text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cluster.messages import DecodeRequest, TokenChunk
from deployments.openai_api import chat_logprobs, completion_logprobs, now, usage
from deployments.tool_stream import ToolCallStream
from deployments.tools import ToolPlan
from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its token ids, and its text where the answer echoes it."""

    token_ids: list[int]
    echo: str = ""


@dataclass(frozen=True)
class Choice:
    """One choice to answer: its index, its prompt, and the internal request that generates
    it (None: nothing to generate, `max_tokens: 0` with `echo`). `echo_only`: the request
    runs for the prompt's logprobs alone (`max_tokens: 0`, `echo`, `logprobs`), and the one
    token it generates is not part of the answer."""

    index: int
    prompt: Prompt
    request: DecodeRequest | None
    echo_only: bool = False


@dataclass
class _Progress:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    finish_reason: str | None = None
    num_output_tokens: int = 0
    # Echo with logprobs: the prompt's tokens, their logprobs and alternatives (the first
    # token has none), once the first chunk brought them.
    echo: tuple[list[int], list[float | None], list[Any]] | None = None

    def take(self, chunk: TokenChunk) -> int:
        """Adds a chunk's text and tokens; returns where its text starts in the choice's."""
        offset = len(self.text)
        self.text += chunk.text
        self.token_ids += chunk.token_ids
        self.logprobs += chunk.logprobs
        self.top += chunk.top_logprobs
        self.num_output_tokens = chunk.num_output_tokens
        self.finish_reason = chunk.finish_reason or self.finish_reason
        return offset


class Answer:
    """The choices of one request as they arrive, and the response they make."""

    def __init__(
        self,
        rid: str,
        chat: bool,
        choices: list[Choice],
        prompt_tokens: int,
        top_logprobs: int | None,
        tokenizer: Tokenizer,
        tools: ToolPlan | None = None,
    ) -> None:
        """`tools`: how the request uses tools (chat only); its choices' text then becomes
        tool calls where the model made them, streamed as the model writes them."""
        self.rid, self.chat, self.choices = rid, chat, choices
        self.tools = tools
        self._tool_streams = {c.index: ToolCallStream(tools) for c in choices} if tools else {}
        self.prompt_tokens = prompt_tokens
        self.wants_logprobs = top_logprobs is not None
        self.top_k = top_logprobs or 0
        self._token_text = tokenizer.token_text
        self._choices = {c.index: c for c in choices}
        self._progress = {c.index: _Progress(text=c.prompt.echo) for c in choices}
        # Completions that echo with logprobs send the prompt with its scores, which come
        # with the first chunk, not before it.
        self._echo_pending = {
            c.index for c in choices if c.prompt.echo and self.wants_logprobs and c.request
        }
        for choice in choices:
            if choice.request is None:
                self._progress[choice.index].finish_reason = "length"

    def add(self, index: int, chunk: TokenChunk) -> dict[str, Any] | None:
        """Takes a choice's chunk; returns its streaming delta (None: nothing to send)."""
        progress = self._progress[index]
        if index in self._echo_pending:
            return self._add_echoed(index, progress, chunk)
        if self._choices[index].echo_only:
            return None
        offset = progress.take(chunk)
        if self.tools is not None:
            return self._tool_delta(index, chunk, offset)
        if not (chunk.text or chunk.finish_reason or (self.wants_logprobs and chunk.token_ids)):
            return None
        logprobs = self._logprobs(chunk.token_ids, chunk.logprobs, chunk.top_logprobs, offset)
        if self.chat:
            delta = {"content": chunk.text} if chunk.text else {}
            return {
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": chunk.finish_reason,
            }
        return {
            "index": index,
            "text": chunk.text,
            "logprobs": logprobs,
            "finish_reason": chunk.finish_reason,
        }

    def opening_events(self) -> list[dict[str, Any]]:
        """What a stream says before any token: each chat choice's role; each completion's
        echoed prompt (and the whole of a choice that generates nothing)."""
        events = []
        for c in self.choices:
            if self.chat:
                delta = {"role": "assistant", "content": ""}
                events.append(
                    {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}
                )
            elif (c.prompt.echo or c.request is None) and c.index not in self._echo_pending:
                events.append(
                    {
                        "index": c.index,
                        "text": c.prompt.echo,
                        "logprobs": None,
                        "finish_reason": "length" if c.request is None else None,
                    }
                )
        return events

    def body(self, model: str) -> dict[str, Any]:
        choices = []
        for c in sorted(self.choices, key=lambda c: c.index):
            p = self._progress[c.index]
            logprobs = self._logprobs(p.token_ids, p.logprobs, p.top, len(c.prompt.echo))
            if logprobs is not None and p.echo is not None:
                logprobs = _joined(self._logprobs(*p.echo, 0), logprobs)
            if self.chat:
                content, calls, finish = self._message(c.index, p)
                message: dict[str, Any] = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                choice = {"index": c.index, "message": message, "logprobs": logprobs}
                choice["finish_reason"] = finish
            else:
                choice = {"index": c.index, "text": p.text, "logprobs": logprobs}
                choice["finish_reason"] = p.finish_reason
            choices.append(choice)
        return {
            "id": self.rid,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": now(),
            "model": model,
            "choices": choices,
            "usage": self.usage(),
        }

    def _message(
        self, index: int, p: _Progress
    ) -> tuple[str | None, list[dict[str, Any]], str | None]:
        """A chat choice's (content, tool calls, finish reason): its text as the model wrote
        it, unless it holds tool calls (read as its chunks came, by its `ToolCallStream`)."""
        if self.tools is None:
            return p.text, [], p.finish_reason
        return self._tool_streams[index].whole()

    def _tool_delta(self, index: int, chunk: TokenChunk, offset: int) -> dict[str, Any] | None:
        """A tool-using choice's delta: content until its calls begin, then each call's header
        and its arguments as they are written."""
        piece, finish = self._tool_streams[index].take(chunk.text, chunk.finish_reason)
        if not (piece.content or piece.tool_calls or finish or self.wants_logprobs):
            return None
        delta: dict[str, Any] = {"content": piece.content} if piece.content else {}
        if piece.tool_calls:
            delta["tool_calls"] = piece.tool_calls
        logprobs = self._logprobs(chunk.token_ids, chunk.logprobs, chunk.top_logprobs, offset)
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def _add_echoed(self, index: int, p: _Progress, chunk: TokenChunk) -> dict[str, Any]:
        """A completion's first chunk when it echoes with logprobs: the prompt, scored, then
        the chunk's own tokens (none of them when the request ran for the scores alone)."""
        self._echo_pending.discard(index)
        choice = self._choices[index]
        scored = chunk.prompt_logprobs or []
        p.echo = (
            list(choice.prompt.token_ids),
            [None, *(lp for _, lp, _ in scored)],
            [None, *(alts for _, _, alts in scored)] if self.top_k else [],
        )
        echoed = self._logprobs(*p.echo, 0)
        if choice.echo_only:
            p.finish_reason = "length"
            return {"index": index, "text": p.text, "logprobs": echoed, "finish_reason": "length"}
        offset = p.take(chunk)
        own = self._logprobs(chunk.token_ids, chunk.logprobs, chunk.top_logprobs, offset)
        return {
            "index": index,
            "text": choice.prompt.echo + chunk.text,
            "logprobs": _joined(echoed, own),
            "finish_reason": chunk.finish_reason,
        }

    def usage(self) -> dict[str, int]:
        """Each prompt counted once, every choice's tokens."""
        completion = sum(p.num_output_tokens for p in self._progress.values())
        return usage(self.prompt_tokens, completion)

    def _logprobs(
        self,
        token_ids: list[int],
        logprobs: list[float],
        top: list[tuple[tuple[int, float], ...]],
        text_offset: int,
    ) -> dict[str, Any] | None:
        if not self.wants_logprobs:
            return None
        if self.chat:
            return chat_logprobs(self._token_text, token_ids, logprobs, top)
        return completion_logprobs(self._token_text, token_ids, logprobs, top, text_offset)


def _joined(first: dict[str, Any] | None, then: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two runs of completions logprobs, one after the other."""
    if first is None or then is None:
        return first or then
    return {
        key: None
        if first[key] is None and then[key] is None
        else (first[key] or []) + (then[key] or [])
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    }
