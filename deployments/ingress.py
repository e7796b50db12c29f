"""The OpenAI-compatible HTTP ingress: validates, tokenizes, mints ids, and streams.

Every check that can fail because of the request happens here, before the decode replica
(and through it the prefill replica) holds anything: authentication, JSON shape, parameter
ranges, prompt length against the context. The router is Serve's own: each request goes to the
decode replica with the fewest outstanding requests (`deployments.routing`), and the decode
replica's call to the prefill role is routed the same way. A client that disconnects cancels the handler, and the cancellation
runs down to the decode and prefill replicas, which abort the request.
"""

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, PositiveFloat, PositiveInt

from cluster.errors import error_reason
from cluster.messages import DecodeRequest, TokenChunk
from cluster.metrics import IngressMetrics
from cluster.metrics_export import (
    directory,
    export_process_metrics,
    scrape_app,
    serve_replica_identity,
)
from deployments.admission import (
    DEFAULT_QUEUE_TIMEOUT_S,
    RoleUnavailable,
    accepted_stream,
    deployment_problem,
)
from deployments.choices import Answer, Choice, Prompt
from deployments.health import Readiness
from deployments.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    now,
)
from deployments.prefill_controller import prompt_length_problem
from engine.config import ModelConfig
from engine.grammar import GrammarError, compile_grammar, grammar_problem
from engine.tokenizer import ChatTemplateError, Tokenizer

log = logging.getLogger(__name__)

API_KEY_ENV = "PDSERVE_API_KEY"
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
READINESS_TIMEOUT_S = 5.0

# The API replica's own series; module-level because FastAPI's error handlers are too.
_metrics: IngressMetrics | None = None


class IngressConfig(BaseModel):
    model: str
    served_model_name: str
    max_model_len: PositiveInt
    max_prompt_len: PositiveInt
    default_max_tokens: PositiveInt = 256
    api_key: str | None = None
    queue_timeout_s: PositiveFloat = DEFAULT_QUEUE_TIMEOUT_S


class ApiError(Exception):
    """An error that becomes an OpenAI-style body with `status`."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    _count(request.url.path, exc.status)
    return JSONResponse(error_body(exc.message, exc.type, exc.param), status_code=exc.status)


def _count(route: str, status: int) -> None:
    if _metrics is not None:
        _metrics.response(route.rsplit("/v1", 1)[-1] or route, status)


class _InFlight:
    """One request counted in `pdserve_requests_in_flight` until released, exactly once, even
    when a streaming body is dropped before it starts."""

    def __init__(self) -> None:
        self._gauge = _metrics.in_flight if _metrics is not None else None
        if self._gauge is not None:
            self._gauge.inc()

    def release(self) -> None:
        gauge, self._gauge = self._gauge, None
        if gauge is not None:
            gauge.dec()

    def __del__(self) -> None:
        self.release()


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    _count(request.url.path, 400)
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        message = "the request body is not valid JSON"
    else:
        where = ".".join(loc)
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg")
    return JSONResponse(
        error_body(message or "invalid request", "invalid_request_error", ".".join(loc) or None),
        status_code=400,
    )


class Ingress:
    """The API surface; one instance per ingress replica."""

    def __init__(self, config: dict[str, Any], decode: Any, prefill: Any = None) -> None:
        from engine.logs import configure_logging

        global _metrics
        configure_logging()
        self.app_name, replica = serve_replica_identity()
        if _metrics is None:
            _metrics = IngressMetrics(replica)
        self.metrics_address = export_process_metrics(self.app_name, "ingress")
        self.config = IngressConfig.model_validate(config)
        self.config.api_key = self.config.api_key or os.environ.get(API_KEY_ENV) or None
        model_config = ModelConfig.from_dir(self.config.model)
        self.tokenizer = Tokenizer.from_dir(
            self.config.model, extra_eos_token_ids=model_config.eos_token_ids
        )
        self.vocab_size = model_config.vocab_size
        self.decode = decode
        self.prefill = prefill  # asked only for its readiness

    # -- routes (bound by `build_ingress_class`) ----------------------------------------------------

    async def health(self) -> JSONResponse:
        """200 while every part can serve; 503 with the reasons while one cannot."""
        parts = await self.readiness_parts()
        reasons = [reason for part in parts for reason in part.reasons]
        if reasons:
            return JSONResponse({"status": "unhealthy", "reasons": reasons}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def ready(self) -> JSONResponse:
        """The readiness view: every part, ready or not and why."""
        parts = await self.readiness_parts()
        ready = all(part.ready for part in parts)
        body = {"ready": ready, "parts": {part.part: part.as_dict() for part in parts}}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def readiness_parts(self) -> list[Readiness]:
        """This replica, one replica of each role (Serve routes the ask), and Serve's own view
        of every deployment of the application (its health checks cover every replica)."""
        roles = [("decode", self.decode), ("prefill", self.prefill)]
        asks = [self._role_readiness(role, handle) for role, handle in roles if handle is not None]
        parts = [Readiness("ingress"), *await asyncio.gather(*asks)]
        if self.app_name:
            parts.append(await asyncio.to_thread(_serve_readiness, self.app_name))
        return parts

    async def _role_readiness(self, role: str, handle: Any) -> Readiness:
        try:
            answer = await asyncio.wait_for(handle.readiness.remote(), READINESS_TIMEOUT_S)
        except Exception as exc:  # no replica answered: none is up, or it hangs
            reason = f"{role}: no replica answered a readiness check ({error_reason(exc)})"
            return Readiness(role, (reason,))
        detail = {k: v for k, v in answer.items() if k not in ("ready", "reasons")}
        return Readiness(role, tuple(answer["reasons"]), detail)

    async def metrics(self) -> PlainTextResponse:
        """Every `pdserve_*` series of this application: all replicas and stage actors."""
        text = await scrape_app(self.app_name, self.metrics_address)
        return PlainTextResponse(text, media_type=PROMETHEUS_CONTENT_TYPE)

    async def metrics_targets(self) -> list[dict[str, Any]]:
        """Prometheus HTTP service discovery: one target per process that exports series."""
        return await directory().targets.remote(self.app_name)

    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": self.config.served_model_name,
                    "object": "model",
                    "created": now(),
                    "owned_by": "pdserve",
                    "max_model_len": self.config.max_model_len,
                }
            ],
        }

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        self._authorize(request)
        self._check_model(body.model)
        prompts = []
        for prompt in body.prompts():
            if isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt)
                prompts.append(Prompt(ids, prompt if body.echo else ""))
                continue
            vocab = self.tokenizer.vocab_size
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise ApiError(
                    400,
                    f"prompt token ids must lie in [0, {vocab})",
                    "invalid_request_error",
                    "prompt",
                )
            prompts.append(Prompt(prompt, self.tokenizer.decode(prompt) if body.echo else ""))
        return await self._serve(body, prompts, chat=False, top_logprobs=body.logprobs)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Any:
        self._authorize(request)
        self._check_model(body.model)
        try:
            messages = [m.for_template() for m in body.messages]
        except ValueError as exc:
            raise ApiError(400, str(exc), "invalid_request_error", "messages") from exc
        tools = body.template_tools()
        try:
            text = self.tokenizer.apply_chat_template(
                messages, **({"tools": tools} if tools else {})
            )
        except ChatTemplateError as exc:  # the template refused these messages
            raise ApiError(400, str(exc), "invalid_request_error", "messages") from exc
        prompt_ids = self.tokenizer.encode(text, add_special_tokens=False)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await self._serve(
            body, [Prompt(prompt_ids)], chat=True, top_logprobs=body.chosen_top_logprobs
        )

    # -- shared path --------------------------------------------------------------------------

    async def _serve(
        self, body: Any, prompts: list[Prompt], chat: bool, top_logprobs: int | None
    ) -> Any:
        """Validates every prompt, then runs the request's choices (n per prompt, each its own
        internal request: its own rid and bootstrap room) and answers them as one response."""
        where = "messages" if chat else "prompt"
        if (problem := body.logit_bias_problem(self.tokenizer.vocab_size)) is not None:
            raise ApiError(400, problem, "invalid_request_error", "logit_bias")
        grammar = await self._grammar(body)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        eos = self.tokenizer.eos_token_ids
        choices: list[Choice] = []
        for p, prompt in enumerate(prompts):
            max_tokens = self._max_tokens(body, len(prompt.token_ids), where)
            # Echo with logprobs: the prefill side scores the prompt too.
            scored = top_logprobs if prompt.echo and top_logprobs is not None else None
            base = p * body.n
            if max_tokens == 0 and scored is None:  # the echo alone
                choices += [Choice(base + j, prompt, None) for j in range(body.n)]
                continue
            # One internal request per prompt, its n choices prefilled once (choice j samples
            # with seed + j); each prompt its own rid and bootstrap room.
            try:
                sampling = body.sampling(
                    max(1, max_tokens), top_logprobs, eos, body.seed, grammar, scored, body.n
                )
            except ValueError as exc:
                raise ApiError(400, str(exc), "invalid_request_error") from exc
            child = rid if len(prompts) == 1 else f"{rid}-{p}"
            request = DecodeRequest(child, secrets.randbits(63), prompt.token_ids, sampling)
            choices += [
                Choice(base + j, prompt, request, echo_only=max_tokens == 0) for j in range(body.n)
            ]
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        in_flight = _InFlight()
        stream = self._choices_stream(choices)
        log.info(
            "request",
            extra={"rid": rid, "prompt_tokens": prompt_tokens, "choices": len(choices)},
        )
        answer = Answer(
            rid,
            chat,
            choices,
            prompt_tokens,
            top_logprobs,
            self.tokenizer,
            tools=body.tool_plan() if chat else None,
        )
        if body.stream:
            # The status line waits for the first token: a request that fails before it
            # (no replica took it, overloaded) gets its real status, not a 200 and an event.
            try:
                stream = await _started(stream)
            except Exception as exc:
                in_flight.release()
                raise _server_error(exc, rid) from exc
            except BaseException:
                in_flight.release()
                raise
            _count("/chat/completions" if chat else "/completions", 200)
            return StreamingResponse(
                _releasing(self._sse(stream, answer, body.include_usage), in_flight),
                media_type="text/event-stream",
            )
        try:
            return await self._collect(stream, answer)
        finally:
            in_flight.release()

    async def _grammar(self, body: Any) -> str | None:
        """The request's structured-output grammar, checked against the model's tokenizer
        (None: unconstrained); a constraint that cannot be built is a 400 naming its field."""
        asked = body.constraint()
        if asked is None:
            return None
        field, kind, spec = asked
        try:
            grammar = compile_grammar(kind, spec)
            problem = await asyncio.to_thread(
                grammar_problem, grammar, self.tokenizer, self.vocab_size
            )
        except GrammarError as exc:
            problem = str(exc)
        if problem is not None:
            raise ApiError(400, f"{field}: {problem}", "invalid_request_error", field)
        return grammar

    def _max_tokens(self, body: Any, n: int, where: str) -> int:
        """The request's max_tokens for a prompt of `n` tokens, or a 400 if they cannot fit."""
        limit = self.config.max_model_len
        max_tokens = body.max_tokens
        if max_tokens is None:
            max_tokens = min(self.config.default_max_tokens, max(1, limit - n))
        if (problem := prompt_length_problem(n, self.config.max_prompt_len)) is not None:
            raise ApiError(400, problem, "invalid_request_error", where)
        if n + max_tokens > limit:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the "
                "completion). Please reduce the length of the prompt or the completion.",
                "invalid_request_error",
                where,
            )
        return max_tokens

    async def _choices_stream(self, choices: list[Choice]) -> AsyncIterator[tuple[int, TokenChunk]]:
        """Every choice's chunks, tagged with its index, in the order they come. Closing it
        (the client left) or a choice's failure ends them all."""
        # One stream per internal request (a prompt's n choices share one); a chunk's index
        # is its choice within the request.
        running, seen = [], set()
        for c in choices:  # a request's first choice has its lowest index
            if c.request is not None and id(c.request) not in seen:
                seen.add(id(c.request))
                running.append((c.index, self._generate(c.request)))
        if len(running) == 1:
            base, stream = running[0]
            async for chunk in stream:
                yield base + chunk.index, chunk
            return
        queue: asyncio.Queue[tuple[int, TokenChunk | BaseException | None]] = asyncio.Queue()

        async def pump(base: int, stream: AsyncIterator[TokenChunk]) -> None:
            try:
                async for chunk in stream:
                    queue.put_nowait((base + chunk.index, chunk))
                queue.put_nowait((base, None))
            except Exception as exc:
                queue.put_nowait((base, exc))
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

        tasks = [asyncio.create_task(pump(index, stream)) for index, stream in running]
        try:
            left = len(tasks)
            while left:
                index, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _generate(self, request: DecodeRequest) -> AsyncIterator[TokenChunk]:
        """The decode stream of `request`. One that fails inside pdserve before its first token
        (a stage died, a KV write failed, a replica was lost) is sent again, once, as a new
        internal request (its own rid and room: the first may still be ending somewhere);
        the client sees one answer. An overloaded or unavailable role (503) is not retried:
        it has had its bounded wait already."""
        for attempt in range(2):
            started = False
            try:
                stream = accepted_stream(
                    self.decode.generate.options(stream=True).remote(request),
                    role=self.decode.deployment_name,
                    app=self.app_name,
                    deployment=self.decode.deployment_name,
                    timeout_s=self.config.queue_timeout_s,
                )
                async for chunk in stream:
                    started = True
                    yield chunk
                return
            except Exception as exc:
                if started or attempt or _overloaded(exc) or isinstance(exc, RoleUnavailable):
                    raise
                reason = error_reason(exc)
                log.warning(
                    "retrying a request that failed before its first token: %s",
                    reason,
                    extra={"rid": request.rid, "room": request.room},
                )
                if _metrics is not None:
                    _metrics.retried(reason)
                request = dataclasses.replace(
                    request, rid=f"{request.rid}-retry", room=secrets.randbits(63)
                )

    async def _collect(self, stream: Any, answer: Answer) -> JSONResponse:
        try:
            async for index, chunk in stream:
                answer.add(index, chunk)
        except Exception as exc:
            raise _server_error(exc, answer.rid) from exc
        _count("/chat/completions" if answer.chat else "/completions", 200)
        return JSONResponse(answer.body(self.config.served_model_name))

    async def _sse(self, stream: Any, answer: Answer, include_usage: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if answer.chat else "text_completion"
        created = now()

        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            payload = {
                "id": answer.rid,
                "object": kind,
                "created": created,
                "model": self.config.served_model_name,
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(payload)}\n\n"

        for start in answer.opening_events():
            yield event([start])
        try:
            async for index, chunk in stream:
                if (delta := answer.add(index, chunk)) is not None:
                    yield event([delta])
        except Exception as exc:
            err = _server_error(exc, answer.rid)
            yield f"data: {json.dumps(error_body(err.message, err.type))}\n\n"
        if include_usage:
            yield event([], usage=answer.usage())
        yield "data: [DONE]\n\n"

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "Incorrect API key provided.", "invalid_request_error")

    def _check_model(self, model: str) -> None:
        if model not in (self.config.served_model_name, self.config.model):
            raise ApiError(
                404,
                f"The model `{model}` does not exist. This server serves "
                f"`{self.config.served_model_name}`.",
                "invalid_request_error",
                "model",
            )


def _overloaded(exc: BaseException) -> bool:
    from deployments.decode import DecodeOverloaded

    return isinstance(exc, DecodeOverloaded) or "DecodeOverloaded" in str(exc)


def _serve_readiness(app: str) -> Readiness:
    """Serve's status of `app`'s deployments, and why any of them cannot take requests
    (blocking: asks the Serve controller)."""
    from ray import serve

    try:
        status = serve.status().applications[app]
    except Exception as exc:
        return Readiness(
            "serve", (f"serve: no status for application {app!r} ({error_reason(exc)})",)
        )
    states = {
        name: str(getattr(d.status, "value", d.status)) for name, d in status.deployments.items()
    }
    problems = {name: deployment_problem(d) for name, d in status.deployments.items()}
    reasons = tuple(f"serve: {name}: {why}" for name, why in problems.items() if why)
    return Readiness("serve", reasons, {"deployments": states})


def _server_error(exc: BaseException, rid: str) -> ApiError:
    unavailable = isinstance(exc, RoleUnavailable)
    reason = error_reason(exc, limit=1000 if unavailable else 300)  # Serve's account is long
    log.error("request failed: %s", reason, extra={"rid": rid})
    if unavailable:
        if _metrics is not None:
            _metrics.unavailable(reason.split(" unavailable:", 1)[0])
        return ApiError(503, reason, "server_error")
    if _metrics is not None:
        _metrics.failure(reason)
    if _overloaded(exc):
        return ApiError(503, f"server overloaded: {reason}", "server_error")
    return ApiError(500, f"request {rid} failed: {reason}", "server_error")


async def _started(stream: AsyncIterator[TokenChunk]) -> AsyncIterator[TokenChunk]:
    """`stream` once its first chunk has arrived (raises what the stream raises before it)."""
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        return _chain((), stream)
    except BaseException:
        await stream.aclose()  # type: ignore[attr-defined]
        raise
    return _chain((first,), stream)


async def _chain(
    head: tuple[TokenChunk, ...], rest: AsyncIterator[TokenChunk]
) -> AsyncIterator[TokenChunk]:
    try:
        for chunk in head:
            yield chunk
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def _releasing(events: AsyncIterator[str], in_flight: _InFlight) -> AsyncIterator[str]:
    """A response body that stops counting as in flight however it ends (done, error, client
    gone); a body never started is released when it is dropped."""
    try:
        async for event in events:
            yield event
    finally:
        in_flight.release()
        await events.aclose()  # type: ignore[attr-defined]


def ingress_deployment(num_replicas: int, num_cpus: float) -> Any:
    """The ingress as a Serve deployment (the same in front of PD and colocated engines)."""
    from ray import serve

    return serve.deployment(build_ingress_class()).options(
        name="ingress",
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=10_000,
    )


def build_ingress_class() -> type:
    """The Serve ingress class with its FastAPI routes (FastAPI binds routes to a class)."""
    from ray import serve

    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)

    @serve.ingress(app)
    class OpenAIIngress(Ingress):
        @app.get("/health")
        async def health_route(self) -> JSONResponse:
            return await self.health()

        @app.get("/ready")
        async def ready_route(self) -> JSONResponse:
            return await self.ready()

        @app.get("/metrics")
        async def metrics_route(self) -> PlainTextResponse:
            return await self.metrics()

        @app.get("/metrics/targets")
        async def metrics_targets_route(self) -> list[dict[str, Any]]:
            return await self.metrics_targets()

        @app.get("/v1/models")
        async def models_route(self, request: Request) -> dict[str, Any]:
            return await self.models(request)

        @app.post("/v1/completions")
        async def completions_route(self, body: CompletionRequest, request: Request) -> Any:
            return await self.completions(body, request)

        @app.post("/v1/chat/completions")
        async def chat_route(self, body: ChatCompletionRequest, request: Request) -> Any:
            return await self.chat(body, request)

    return OpenAIIngress
