"""A SIMULATED OpenAI-compatible upstream for demos, tests and benchmarks.

This is not a model: it answers from a table (`answers`, exact match on the stripped last
user message) or with a default, with configurable latency, jitter, time to first token and
error rate. It speaks enough of the OpenAI API (chat completions with `n` choices and tool calls,
legacy completions, embeddings, responses; JSON and SSE streaming, `usage`, `finish_reason`,
`GET /v1/models`) and of Anthropic Messages (`POST /v1/messages`, streamed or not) for the router,
the evaluator and the SDKs to be exercised end to end without network access or keys.

Deterministic rules the tests rely on: choice i > 0 answers "<answer> [i]"; a request with `tools`
(and a tool choice other than "none") calls its first tool with `{"q": <last user text>}` (a chat completion's
with its model's `tool_arguments`, when set);
embeddings are `dimensions` floats derived from a hash of each input; `cached_tokens` of a model is
reported as cached prompt tokens (OpenAI) or `cache_read_input_tokens` (Anthropic). Given a seed, the same sequence of
requests to a model gets the same latencies and the same injected errors.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import math
import random
import struct
import time
from pathlib import Path
from typing import Annotated, Any, Self

import msgspec
from aiohttp import web

from lockgate import metrics
from lockgate.documents import NonNegative, load_yaml
from lockgate.errors import LockgateError
from lockgate.ids import uuid7
from lockgate.llmwire import (
    ChatRequest,
    Message,
    decode_request,
    input_text,
    last_user_text,
    null_stream_is_false,
    text_of,
)
from lockgate.server.tls import listen_http


class ModelSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How one simulated model answers."""

    answers: dict[str, str] = {}
    default: str = "ok"
    latency_ms: NonNegative = 0.0
    jitter_ms: NonNegative = 0.0
    error_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    ttft_ms: NonNegative = 0.0
    # the natural-log probability reported for every token when `logprobs` is asked
    logprob: Annotated[float, msgspec.Meta(le=0)] = -0.1
    cached_tokens: NonNegative = 0  # prompt tokens reported as served from the provider's cache
    dimensions: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 8  # embedding length
    # When set, a text asked again gets the next of these (cycling) in place of `answers`/`default`: a model
    # sampled at a temperature answers the same question differently (an LLM judge asked n times).
    turns: list[str] = []
    # When set, the arguments of every chat tool call it makes, in place of `{"q": <last user text>}`: a model that
    # leaks through its tool calls what it never says in its text (a key in an e-mail it sends).
    tool_arguments: str = ""
    # A stream's pause between its finish chunks and its usage chunk (and `[DONE]`), as a provider totting up the
    # usage: a client stopping at the finish reason leaves before it (probe p71 F1).
    usage_tail_ms: NonNegative = 0.0


class SimConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The simulated models by name, and the seed that makes runs repeatable."""

    models: dict[str, ModelSpec]
    seed: int = 0
    # When set, an API request without this key (`Authorization: Bearer <key>`, or `x-api-key` as Anthropic
    # sends it) is answered 401, as a provider does: tests show which credential reached the upstream.
    require_key: str = ""


def load_config(path: str | Path) -> SimConfig:
    """Read a simulator config from YAML; raises ConfigError naming the path of what is wrong."""
    return load_yaml(path, SimConfig, name="simulator config")


def count_tokens(text: str) -> int:
    """Rough token count (~1.3 tokens per word), at least 1 for non-empty text."""
    words = len(text.split())
    return max(1, math.ceil(words * 1.3)) if text.strip() else 0


def _pieces(answer: str) -> list[str]:
    """The answer as simulated tokens: one per word, later words with their leading space."""
    return [w if i == 0 else " " + w for i, w in enumerate(answer.split(" "))] if answer else []


def _logprobs(pieces: list[str], logprob: float) -> dict[str, Any]:
    """OpenAI's choices[].logprobs: one {token, logprob, bytes, top_logprobs} per token."""
    return {"content": [{"token": t, "logprob": logprob, "bytes": list(t.encode()), "top_logprobs": []}
                        for t in pieces]}


def _error(status: int, message: str, type_: str, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status)


def _anthropic_error(status: int, message: str, type_: str) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": type_, "message": message}}, status=status)



def _embedding_inputs(value: Any) -> list[tuple[str, int]] | None:
    """OpenAI's embeddings inputs as (text to embed, tokens): a string, a token array, or a non-empty list of
    either (LangChain sends token arrays by default); None for anything else."""
    def one(x: Any) -> tuple[str, int] | None:
        if isinstance(x, str):
            return x, count_tokens(x)
        if isinstance(x, list) and x and all(type(t) is int and t >= 0 for t in x):
            return " ".join(map(str, x)), len(x)
        return None

    items = [value] if isinstance(value, str) or (isinstance(value, list) and value and type(value[0]) is int) \
        else value if isinstance(value, list) else []
    found = [one(x) for x in items]
    return found if found and all(f is not None for f in found) else None  # type: ignore[return-value]

def _embedding(text: str, dimensions: int) -> list[float]:
    """A deterministic unit-ish vector for a text (not a meaningful embedding)."""
    digest = b""
    counter = 0
    while len(digest) < dimensions * 4:
        digest += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    return [round(int.from_bytes(digest[i * 4:i * 4 + 4], "big") / 2**32 * 2 - 1, 6) for i in range(dimensions)]


class _Anthropic(msgspec.Struct):
    """The Anthropic Messages request fields the simulator reads."""

    model: str = ""
    messages: list[Message] = []
    system: Any = None
    max_tokens: int | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None


class _Request(msgspec.Struct):
    """Fields of the other OpenAI operations: completions (`prompt`), embeddings and responses (`input`)."""

    model: str = ""
    prompt: Any = None
    input: Any = None
    stream: bool | None = False  # null is false, as OpenAI reads it (null_stream_is_false)
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = None
    max_output_tokens: int | None = None
    n: int | None = None
    instructions: str | None = None
    encoding_format: str | None = None
    dimensions: int | None = None
    tools: list[dict[str, Any]] | None = None
    # Echoed back in a Response object, as OpenAI's Responses API does.
    user: str | None = None
    metadata: dict[str, str] | None = None

    def __post_init__(self) -> None:
        null_stream_is_false(self)


_decode_other = msgspec.json.Decoder(_Request).decode
_decode_anthropic = msgspec.json.Decoder(_Anthropic).decode


class _Model:
    """A model's spec plus its own seeded random stream (order of requests decides draws)."""

    def __init__(self, name: str, spec: ModelSpec, seed: int) -> None:
        self.name = name
        self.spec = spec
        self.answers = {k.strip(): v for k, v in spec.answers.items()}
        self.rng = random.Random(f"{seed}:{name}")
        self.asked: dict[str, int] = {}  # times each text was asked, for `turns`

    def draw(self) -> tuple[float, bool]:
        """Latency in seconds and whether this request fails."""
        s = self.spec
        jitter = self.rng.uniform(-s.jitter_ms, s.jitter_ms) if s.jitter_ms else 0.0
        failed = self.rng.random() < s.error_rate if s.error_rate else False
        return max(0.0, s.latency_ms + jitter) / 1000.0, failed


class SimServer:
    """The simulator as an aiohttp server: `async with SimServer(cfg) as sim: sim.url`."""

    def __init__(self, config: SimConfig, host: str = "127.0.0.1", port: int = 0, *,
                 port_flag: str = "--port", serve_metrics: bool = False) -> None:
        self.config = config
        # Only a simulator in a process of its own serves that process's /metrics: beside a router (`dev up`) it
        # would serve the router's request counters by arm with no key, which the router's own /metrics refuses.
        self.serve_metrics = serve_metrics
        self.host = host
        self.port = port
        self.port_flag = port_flag  # the option that chose `port`, named if it cannot be had
        self.requests: dict[str, int] = {}
        # The Authorization header of each chat request, in order: lets tests see which key reached
        # the upstream (lockgate's provider credential, never the client's lockgate key).
        self.authorizations: list[str | None] = []
        self.headers: list[dict[str, str]] = []  # every request's headers, in order
        self.unauthorized = 0  # requests refused for a missing or wrong key (require_key)
        self.disconnects = 0  # calls the client closed before they were answered (streamed or not)
        self.disconnected = asyncio.Event()  # set at the first one: tests wait on it, not on the clock
        self._models = {n: _Model(n, s, config.seed) for n, s in config.models.items()}
        self._runner: web.AppRunner | None = None
        self._created = int(time.time())

    @property
    def url(self) -> str:
        """Base URL for OpenAI clients, e.g. http://127.0.0.1:PORT/v1."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def total_requests(self) -> int:
        """Chat-completion requests answered so far, over all models."""
        return sum(self.requests.values())

    async def start(self) -> None:
        """Bind and serve (port 0 picks a free port; `url` then has the real one)."""
        app = web.Application(middlewares=[self._keyed] if self.config.require_key else [])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_get("/v1/models", self._list_models)
        if self.serve_metrics:
            app.router.add_get("/metrics", metrics.serve_prometheus)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await listen_http(self._runner, self.host, self.port, what="simulator", flag=self.port_flag)
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @web.middleware
    async def _keyed(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """401 for an API request without the required key (its value is never echoed)."""
        key = self.config.require_key
        bearer = request.headers.get("Authorization", "")
        sent = {request.headers.get("x-api-key"), bearer[7:] if bearer.startswith("Bearer ") else None}
        if request.path.startswith("/v1/") and key not in sent:
            self.unauthorized += 1
            if request.path == "/v1/messages":
                return _anthropic_error(401, "invalid x-api-key", "authentication_error")
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        return await handler(request)

    async def _list_models(self, request: web.Request) -> web.Response:
        data = [{"id": n, "object": "model", "created": self._created, "owned_by": "lockgate-sim"}
                for n in self._models]
        return web.json_response({"object": "list", "data": data})

    def _gone(self) -> None:
        self.disconnects += 1
        self.disconnected.set()

    def _model(self, name: str) -> _Model | None:
        model = self._models.get(name)
        if model is not None:
            self.requests[model.name] = self.requests.get(model.name, 0) + 1
        return model

    @staticmethod
    def _answer(model: _Model, text: str, max_tokens: int | None) -> tuple[str, str]:
        """The answer to a text and its finish reason ("length" when max_tokens cut it)."""
        if turns := model.spec.turns:
            k = model.asked[text] = model.asked.get(text, -1) + 1
            answer = turns[k % len(turns)]
        else:
            answer = model.answers.get(text.strip(), model.spec.default)
        if max_tokens is not None and max_tokens > 0:
            words = answer.split()
            limit = max(1, int(max_tokens / 1.3))
            if len(words) > limit:
                return " ".join(words[:limit]), "length"
        return answer, "stop"

    def _usage(self, model: _Model, prompt: int, completion: int) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion}
        if model.spec.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": min(prompt, int(model.spec.cached_tokens))}
        return usage

    async def _read(self, request: web.Request) -> bytes:
        self.authorizations.append(request.headers.get("Authorization"))
        self.headers.append(dict(request.headers))
        return await request.read()

    async def _other(self, request: web.Request) -> tuple[_Request, _Model] | web.Response:
        """The body of a completions, embeddings or responses request and its model, or the error answer."""
        try:
            body = _decode_other(await self._read(request))
        except msgspec.DecodeError as exc:
            return _error(400, f"invalid request: {exc}", "invalid_request_error")
        model = self._model(body.model)
        if model is None:
            return _error(404, f"The model '{body.model}' does not exist", "invalid_request_error", "model_not_found")
        return body, model

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = decode_request(await self._read(request))
        except msgspec.ValidationError as exc:
            return _error(400, f"invalid request: {exc}", "invalid_request_error")
        except msgspec.DecodeError:
            return _error(400, "request body is not valid JSON", "invalid_request_error")
        if not body.messages:
            return _error(400, "'messages' must be a non-empty list", "invalid_request_error")
        model = self._model(body.model)
        if model is None:
            return _error(404, f"The model '{body.model}' does not exist", "invalid_request_error", "model_not_found")
        delay, failed = model.draw()
        prompt_text = " ".join(text_of(m.content) for m in body.messages)
        user_text = last_user_text(body.messages) or ""
        answer, finish = self._answer(model, user_text, body.max_completion_tokens or body.max_tokens)
        n = max(1, body.n or 1)
        answers = [answer if i == 0 else f"{answer} [{i}]" for i in range(n)]
        tool = _tool_called(body)
        usage = self._usage(model, count_tokens(prompt_text), sum(count_tokens(a) for a in answers))
        logprob = model.spec.logprob if body.logprobs is True else None
        meta = {"id": "chatcmpl-" + uuid7().replace("-", "")[:24], "created": int(time.time()), "model": model.name}
        if tool is not None:
            finish = "tool_calls"
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return await self._stream(request, model, meta, answers, finish, usage, delay, failed, include_usage,
                                      logprob, tool, self._tool_arguments(model, user_text))
        if delay:
            await asyncio.sleep(delay)
            if request.transport is None:  # the client closed its connection while it waited: count it
                self._gone()
        if failed:
            return _error(500, "The simulated server had an error processing your request", "server_error")
        choices = []
        for i, text in enumerate(answers):
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool is not None:
                message = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": f"call_{i}", "type": "function",
                     "function": {"name": tool, "arguments": self._tool_arguments(model, user_text)}}]}
            choices.append({"index": i, "message": message,
                            "logprobs": None if logprob is None else _logprobs(_pieces(text), logprob),
                            "finish_reason": finish})
        return web.json_response({**meta, "object": "chat.completion", "choices": choices, "usage": usage})

    @staticmethod
    def _tool_arguments(model: _Model, user_text: str) -> str:
        """The arguments of a chat tool call `model` makes, as JSON text."""
        return model.spec.tool_arguments or msgspec.json.encode({"q": user_text}).decode()

    async def _open_stream(self, request: web.Request, model: _Model) -> web.StreamResponse:
        ttft = model.spec.ttft_ms / 1000.0
        if ttft:
            await asyncio.sleep(ttft)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        return resp

    def _gap(self, model: _Model, delay: float, tokens: int) -> float:
        """The rest of the latency, spread over the tokens after the first."""
        return max(0.0, delay - model.spec.ttft_ms / 1000.0) / max(1, tokens - 1) if tokens > 1 else 0.0

    async def _stream(
        self,
        request: web.Request,
        model: _Model,
        meta: dict[str, Any],
        answers: list[str],
        finish: str,
        usage: dict[str, Any],
        delay: float,
        failed: bool,
        include_usage: bool,
        logprob: float | None,
        tool: str | None,
        args: str,
    ) -> web.StreamResponse:
        if failed:
            if model.spec.ttft_ms:
                await asyncio.sleep(model.spec.ttft_ms / 1000.0)
            return _error(500, "The simulated server had an error processing your request", "server_error")
        resp = await self._open_stream(request, model)
        pieces = [_pieces(a) for a in answers]
        gap = self._gap(model, delay, len(pieces[0]))

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            chunk = {**meta, "object": "chat.completion.chunk", "choices": choices, **extra}
            await resp.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")

        try:
            for i in range(len(answers)):
                await send([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            if tool is not None:
                for i in range(len(answers)):  # the arguments in two pieces, as real streams split them
                    await send([{"index": i, "delta": {"tool_calls": [{"index": 0, "id": f"call_{i}", "type": "function",
                                                                       "function": {"name": tool, "arguments": ""}}]},
                                 "finish_reason": None}])
                    for part in (args[:len(args) // 2], args[len(args) // 2:]):
                        await send([{"index": i, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": part}}]},
                                     "finish_reason": None}])
            else:
                # interleaved: token k of every choice before token k+1 of any
                for k in range(max(len(p) for p in pieces)):
                    if k and gap:
                        await asyncio.sleep(gap)
                    for i, ps in enumerate(pieces):
                        if k < len(ps):
                            choice: dict[str, Any] = {"index": i, "delta": {"content": ps[k]}, "finish_reason": None}
                            if logprob is not None:
                                choice["logprobs"] = _logprobs([ps[k]], logprob)
                            await send([choice])
            for i in range(len(answers)):
                await send([{"index": i, "delta": {}, "finish_reason": finish}])
            if model.spec.usage_tail_ms:
                await asyncio.sleep(model.spec.usage_tail_ms / 1000.0)
            if include_usage:
                await send([], usage=usage)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            self._gone()
        return resp

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        """Legacy `POST /v1/completions`: `prompt` (string or list of strings) in, `choices[].text` out."""
        found = await self._other(request)
        if isinstance(found, web.Response):
            return found
        body, model = found
        prompt = input_text(body.prompt) or ""
        answer, finish = self._answer(model, prompt, body.max_tokens)
        n = max(1, body.n or 1)
        answers = [answer if i == 0 else f"{answer} [{i}]" for i in range(n)]
        usage = self._usage(model, count_tokens(prompt), sum(count_tokens(a) for a in answers))
        delay, failed = model.draw()
        meta = {"id": "cmpl-" + uuid7().replace("-", "")[:24], "object": "text_completion", "created": int(time.time()),
                "model": model.name}
        if failed:
            return _error(500, "The simulated server had an error processing your request", "server_error")
        if not body.stream:
            if delay:
                await asyncio.sleep(delay)
            return web.json_response({**meta, "choices": [
                {"index": i, "text": a, "logprobs": None, "finish_reason": finish} for i, a in enumerate(answers)],
                "usage": usage})
        resp = await self._open_stream(request, model)
        pieces = [_pieces(a) for a in answers]
        gap = self._gap(model, delay, len(pieces[0]))
        try:
            for k in range(max(len(p) for p in pieces)):
                if k and gap:
                    await asyncio.sleep(gap)
                for i, ps in enumerate(pieces):
                    if k < len(ps):
                        await _sse(resp, {**meta, "choices": [{"index": i, "text": ps[k], "logprobs": None,
                                                               "finish_reason": None}]})
            for i in range(n):
                await _sse(resp, {**meta, "choices": [{"index": i, "text": "", "logprobs": None,
                                                       "finish_reason": finish}]})
            if (body.stream_options or {}).get("include_usage"):
                await _sse(resp, {**meta, "choices": [], "usage": usage})
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            self._gone()
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        """`POST /v1/embeddings`: float lists, or base64 float32 (what the openai package asks for)."""
        found = await self._other(request)
        if isinstance(found, web.Response):
            return found
        body, model = found
        inputs = _embedding_inputs(body.input)
        if inputs is None:
            return _error(400, "'input' must be a string, a token array, or a non-empty list of either",
                          "invalid_request_error")
        dims = body.dimensions or model.spec.dimensions
        data = []
        for i, (text, _) in enumerate(inputs):
            vector = _embedding(text, dims)
            value: Any = vector
            if body.encoding_format == "base64":
                value = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(n for _, n in inputs)
        return web.json_response({"object": "list", "data": data, "model": model.name,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/responses`: one output message (or a function call when tools are given), streamed
        as the Responses API events when asked."""
        found = await self._other(request)
        if isinstance(found, web.Response):
            return found
        body, model = found
        text = input_text(body.input) or ""
        answer, finish = self._answer(model, text, body.max_output_tokens)
        prompt_tokens = count_tokens(" ".join(filter(None, (body.instructions, text))))
        usage = {"input_tokens": prompt_tokens,
                 "input_tokens_details": {"cached_tokens": min(prompt_tokens, int(model.spec.cached_tokens))},
                 "output_tokens": count_tokens(answer), "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": prompt_tokens + count_tokens(answer)}
        rid, mid = "resp_" + uuid7().replace("-", "")[:24], "msg_" + uuid7().replace("-", "")[:24]
        tool = next((t.get("name") for t in body.tools or () if t.get("type") == "function"), None)
        if tool is not None:
            item: dict[str, Any] = {"type": "function_call", "id": "fc_" + mid[4:], "call_id": "call_0", "name": tool,
                                    "arguments": msgspec.json.encode({"q": text}).decode(), "status": "completed"}
        else:
            item = {"type": "message", "id": mid, "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": answer, "annotations": []}]}
        base = {"id": rid, "object": "response", "created_at": int(time.time()), "model": model.name,
                "instructions": body.instructions, "tools": body.tools or [], "tool_choice": "auto",
                "parallel_tool_calls": True, "metadata": body.metadata or {}, "user": body.user, "error": None,
                "incomplete_details": None}
        status = "completed" if finish == "stop" else "incomplete"
        done = {**base, "status": status, "output": [item], "usage": usage}
        if finish != "stop":
            done["incomplete_details"] = {"reason": "max_output_tokens"}
        delay, failed = model.draw()
        if failed:
            return _error(500, "The simulated server had an error processing your request", "server_error")
        if not body.stream:
            if delay:
                await asyncio.sleep(delay)
            return web.json_response(done)
        resp = await self._open_stream(request, model)
        seq = 0

        async def event(type_: str, **data: Any) -> None:
            nonlocal seq
            await resp.write(f"event: {type_}\n".encode() + b"data: "
                             + msgspec.json.encode({"type": type_, "sequence_number": seq, **data}) + b"\n\n")
            seq += 1

        try:
            await event("response.created", response={**base, "status": "in_progress", "output": [], "usage": None})
            await event("response.in_progress", response={**base, "status": "in_progress", "output": [],
                                                          "usage": None})
            if tool is None:
                await event("response.output_item.added", output_index=0,
                            item={**item, "status": "in_progress", "content": []})
                part = {"type": "output_text", "text": "", "annotations": []}
                await event("response.content_part.added", item_id=mid, output_index=0, content_index=0, part=part)
                pieces = _pieces(answer)
                gap = self._gap(model, delay, len(pieces))
                for k, piece in enumerate(pieces):
                    if k and gap:
                        await asyncio.sleep(gap)
                    await event("response.output_text.delta", item_id=mid, output_index=0, content_index=0,
                                delta=piece, logprobs=[])
                await event("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=answer,
                            logprobs=[])
                await event("response.content_part.done", item_id=mid, output_index=0, content_index=0,
                            part={**part, "text": answer})
            else:
                await event("response.output_item.added", output_index=0, item={**item, "arguments": ""})
                await event("response.function_call_arguments.delta", item_id=item["id"], output_index=0,
                            delta=item["arguments"])
                await event("response.function_call_arguments.done", item_id=item["id"], output_index=0,
                            arguments=item["arguments"])
            await event("response.output_item.done", output_index=0, item=item)
            await event("response.completed" if status == "completed" else "response.incomplete", response=done)
            await resp.write_eof()
        except ConnectionResetError:
            self._gone()
        return resp

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic Messages `POST /v1/messages`: its own request, answer, error and stream shapes."""
        try:
            body = _decode_anthropic(await self._read(request))
        except msgspec.DecodeError as exc:
            return _anthropic_error(400, f"invalid request: {exc}", "invalid_request_error")
        if not body.max_tokens:
            return _anthropic_error(400, "max_tokens: Field required", "invalid_request_error")
        if not body.messages or body.messages[0].role != "user":
            return _anthropic_error(400, "messages: the first message must use the user role",
                                    "invalid_request_error")
        model = self._model(body.model)
        if model is None:
            return _anthropic_error(404, f"model: {body.model}", "not_found_error")
        user_text = last_user_text(body.messages) or ""
        answer, finish = self._answer(model, user_text, body.max_tokens)
        system = body.system if isinstance(body.system, str) else text_of(body.system)
        prompt = count_tokens(" ".join([system or "", *(text_of(m.content) for m in body.messages)]))
        cached = min(prompt, int(model.spec.cached_tokens))
        choice = (body.tool_choice or {}).get("type")
        tool = body.tools[0]["name"] if body.tools and choice != "none" else None
        stop = "tool_use" if tool else ("end_turn" if finish == "stop" else "max_tokens")
        blocks: list[dict[str, Any]] = [{"type": "text", "text": answer}]
        if tool:
            blocks = [{"type": "tool_use", "id": "toolu_0", "name": tool, "input": {"q": user_text}}]
        usage = {"input_tokens": prompt - cached, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
                 "output_tokens": count_tokens(answer) if not tool else 5}
        msg = {"id": "msg_" + uuid7().replace("-", "")[:24], "type": "message", "role": "assistant",
               "model": model.name, "content": blocks, "stop_reason": stop, "stop_sequence": None, "usage": usage}
        delay, failed = model.draw()
        if failed:
            return _anthropic_error(529, "Overloaded", "overloaded_error")
        if not body.stream:
            if delay:
                await asyncio.sleep(delay)
            return web.json_response(msg)
        resp = await self._open_stream(request, model)

        async def event(type_: str, **data: Any) -> None:
            await resp.write(f"event: {type_}\n".encode() + b"data: " + msgspec.json.encode({"type": type_, **data})
                             + b"\n\n")

        try:
            await event("message_start", message={**msg, "content": [], "stop_reason": None,
                                                  "usage": {**usage, "output_tokens": 1}})
            await event("ping")
            if tool:
                await event("content_block_start", index=0, content_block={**blocks[0], "input": {}})
                args = msgspec.json.encode({"q": user_text}).decode()
                for part in (args[:len(args) // 2], args[len(args) // 2:]):
                    await event("content_block_delta", index=0, delta={"type": "input_json_delta", "partial_json": part})
            else:
                await event("content_block_start", index=0, content_block={"type": "text", "text": ""})
                pieces = _pieces(answer)
                gap = self._gap(model, delay, len(pieces))
                for k, piece in enumerate(pieces):
                    if k and gap:
                        await asyncio.sleep(gap)
                    await event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
            await event("content_block_stop", index=0)
            await event("message_delta", delta={"stop_reason": stop, "stop_sequence": None},
                        usage={"output_tokens": usage["output_tokens"]})
            await event("message_stop")
            await resp.write_eof()
        except ConnectionResetError:
            self._gone()
        return resp


async def _sse(resp: web.StreamResponse, data: dict[str, Any]) -> None:
    await resp.write(b"data: " + msgspec.json.encode(data) + b"\n\n")


def _tool_called(body: ChatRequest) -> str | None:
    """The tool a chat request makes the simulator call: its first function, unless tool_choice is "none"."""
    if not body.tools or body.tool_choice == "none":
        return None
    fn = body.tools[0].get("function") or {}
    return fn.get("name") or None


async def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 9000) -> None:
    """Run the simulator until cancelled (used by `python -m lockgate_dev.sim`)."""
    async with SimServer(config, host, port, serve_metrics=True) as sim:
        print(f"lockgate simulator (not a real model) serving {', '.join(config.models)} at {sim.url}", flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m lockgate_dev.sim [--config sim.yaml] [--port 9000] [--require-key KEY]`."""
    parser = argparse.ArgumentParser(description="Simulated OpenAI-compatible upstream (for demos and tests).")
    parser.add_argument("--config", help="YAML with `models:` and `seed:`; default: one model 'sim-model'")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--require-key", default="", help="answer 401 to requests without this API key "
                                                          "(Authorization: Bearer, or x-api-key)")
    args = parser.parse_args(argv)
    config = load_config(args.config) if args.config else SimConfig(models={"sim-model": ModelSpec()})
    if args.require_key:
        config.require_key = args.require_key
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(config, args.host, args.port))
    except LockgateError as exc:  # a busy --port, say: one line, as `lockgate sim` says it
        parser.exit(exc.exit_code, f"error: {exc.message}\n")


if __name__ == "__main__":
    main()
