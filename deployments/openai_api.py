"""OpenAI request and response shapes pdserve accepts and returns (the subset it supports).

Validation happens here, before any prefill or decode state exists: unknown fields are
ignored as OpenAI does; a known field pdserve cannot honour (`suffix`, `best_of` other than
`n`, the deprecated `functions`) is refused with a 400 that names it, never ignored; and everything the
engine needs for each choice is turned into one `SamplingParams`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.tools import ToolPlan, forced_schema, template_message, tool_plan
from engine.sampling_params import MAX_TOP_LOGPROBS, SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


MAX_CHOICES = 32  # n, and n times the prompts of one completions request


def _refuse(name: str, why: str) -> ValueError:
    return ValueError(f"{name} is not supported: {why}")


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)  # extension, as vLLM
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool = False  # extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)  # extension, as vLLM
    min_tokens: int = Field(0, ge=0)  # extension, as vLLM
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Structured output: OpenAI's response_format, or one of vLLM's guided_* extensions.
    response_format: ResponseFormat | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {token!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value

    @model_validator(mode="after")
    def _one_constraint(self) -> _Common:
        asked = [name for name, _ in self._constraints()]
        if len(asked) > 1:
            raise ValueError(f"only one structured-output constraint at a time, got {asked}")
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
            raise ValueError("response_format json_schema needs its json_schema.schema")
        return self

    def _constraints(self) -> list[tuple[str, tuple[str, Any]]]:
        """(field, (grammar kind, spec)) for each structured-output field set."""
        found = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            found.append(("response_format", ("json_object", None)))
        elif fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
            found.append(("response_format", ("json_schema", fmt.json_schema.json_schema)))
        for name, kind in (
            ("guided_json", "json_schema"),
            ("guided_regex", "regex"),
            ("guided_choice", "choice"),
            ("guided_grammar", "lark"),
        ):
            if getattr(self, name) is not None:
                found.append((name, (kind, getattr(self, name))))
        return found

    def constraint(self) -> tuple[str, str, Any] | None:
        """The structured-output constraint asked for, as (field, grammar kind, spec)."""
        found = self._constraints()
        return (found[0][0], *found[0][1]) if found else None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return value

    def sampling(
        self,
        max_tokens: int,
        top_logprobs: int | None = None,
        eos_token_ids: tuple[int, ...] = (),
        seed: int | None = None,
        grammar: str | None = None,
        prompt_logprobs: int | None = None,
        n: int = 1,
    ) -> SamplingParams:
        """The engine's parameters for one prompt's `n` choices: `top_logprobs` None asks for
        no logprobs; choice i samples with `seed + i` (n choices of one seeded request
        differ)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=seed,
            max_tokens=max_tokens,
            stop=tuple(stops),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=top_logprobs is not None,
            top_logprobs=top_logprobs or 0,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=tuple((int(t), b) for t, b in (self.logit_bias or {}).items()),
            min_tokens=self.min_tokens,
            eos_token_ids=eos_token_ids if self.min_tokens else (),
            grammar=grammar,
            prompt_logprobs=prompt_logprobs,
            n=n,
        )

    def logit_bias_problem(self, vocab_size: int) -> str | None:
        for token in self.logit_bias or {}:
            if not 0 <= int(token) < vocab_size:
                return f"logit_bias token id {token} is outside the vocabulary [0, {vocab_size})"
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Common):
    prompt: Prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(p in ("", []) for p in value)):
            raise ValueError("the prompt is empty")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise _refuse("suffix", "this model has no fill-in-the-middle format")
        return value

    @model_validator(mode="after")
    def _choices(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise _refuse("best_of", "only best_of equal to n (or unset)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 answers nothing without echo")
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise ValueError(f"prompts times n must be at most {MAX_CHOICES}")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One prompt per item: a text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(t, int) for t in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's result: the call it answers
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        """This message as the chat template reads it (ValueError: content it cannot)."""
        return template_message(
            {
                "role": self.role,
                "content": self.text(),
                "tool_calls": self.tool_calls,
                "tool_call_id": self.tool_call_id,
                "name": self.name,
            }
        )

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = [p.get("text", "") for p in self.content if p.get("type") == "text"]
            if len(parts) != len(self.content):
                raise ValueError("only text content parts are supported")
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.max_tokens == 0:
            raise ValueError("max_tokens must be at least 1")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.functions or self.function_call:
            raise _refuse("functions", "use tools (functions is deprecated)")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice needs tools")
        plan = self.tool_plan()  # checks the tools and the choice
        if plan is not None and plan.mode != "auto" and super().constraint() is not None:
            raise ValueError("a forced tool call cannot also follow response_format or guided_*")
        return self

    def tool_plan(self) -> ToolPlan | None:
        """How this request uses its tools (None: no tools, or tool_choice none)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return tool_plan(self.tools, self.tool_choice)

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the chat template shows the model."""
        return self.tools if self.tool_plan() is not None else None

    def constraint(self) -> tuple[str, str, Any] | None:
        """A forced tool call (required, or a named function) is a JSON-schema grammar."""
        plan = self.tool_plan()
        if plan is not None and plan.mode != "auto":
            schema = forced_schema(self.tools or [], plan, self.parallel_tool_calls is not False)
            return ("tool_choice", "json_schema", schema)
        return super().constraint()

    @property
    def chosen_top_logprobs(self) -> int | None:
        """Alternatives per token to report, or None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


TokenText = Callable[[int], str]


def completion_logprobs(
    token_text: TokenText,
    token_ids: list[int],
    logprobs: list[float | None],
    top: list[tuple[tuple[int, float], ...] | None],
    text_offset: int,
) -> dict[str, Any]:
    """The completions API's `logprobs` for some tokens: their text, logprobs, the top
    alternatives as {text: logprob} (none asked: null), and where each token starts in the
    choice's text. An echoed prompt's first token has no logprob (null)."""
    texts = [token_text(t) for t in token_ids]
    offsets = []
    for piece in texts:
        offsets.append(text_offset)
        text_offset += len(piece)
    return {
        "tokens": texts,
        "token_logprobs": logprobs,
        "top_logprobs": [
            None if alts is None else {token_text(t): lp for t, lp in alts} for alts in top
        ]
        or None,
        "text_offset": offsets,
    }


def chat_logprobs(
    token_text: TokenText,
    token_ids: list[int],
    logprobs: list[float],
    top: list[tuple[tuple[int, float], ...]],
) -> dict[str, Any]:
    """The chat API's `logprobs` for some tokens: one entry per token, each with its top
    alternatives."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    alternatives = top or [()] * len(token_ids)
    content = [
        {**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]}
        for t, lp, alts in zip(token_ids, logprobs, alternatives, strict=True)
    ]
    return {"content": content, "refusal": None}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def now() -> int:
    return int(time.time())
