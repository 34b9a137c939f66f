"""A SIMULATED OpenAI-compatible upstream for demos, tests and benchmarks.

This is not a model: it answers from a table (`answers`, exact match on the stripped last
user message) or with a default, with configurable latency, jitter, time to first token and
error rate. It speaks enough of the OpenAI Chat Completions API (JSON and SSE streaming,
`usage`, `finish_reason`, `GET /v1/models`) for the router, the evaluator and the SDK to be
exercised end to end without network access or keys. Given a seed, the same sequence of
requests to a model gets the same latencies and the same injected errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import time
from pathlib import Path
from typing import Annotated, Any, Self

import msgspec
from aiohttp import web

from lockgate import metrics
from lockgate.documents import NonNegative, load_yaml
from lockgate.ids import uuid7
from lockgate.llmwire import decode_request, last_user_text, text_of


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


class SimConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The simulated models by name, and the seed that makes runs repeatable."""

    models: dict[str, ModelSpec]
    seed: int = 0


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


class _Model:
    """A model's spec plus its own seeded random stream (order of requests decides draws)."""

    def __init__(self, name: str, spec: ModelSpec, seed: int) -> None:
        self.name = name
        self.spec = spec
        self.answers = {k.strip(): v for k, v in spec.answers.items()}
        self.rng = random.Random(f"{seed}:{name}")

    def draw(self) -> tuple[float, bool]:
        """Latency in seconds and whether this request fails."""
        s = self.spec
        jitter = self.rng.uniform(-s.jitter_ms, s.jitter_ms) if s.jitter_ms else 0.0
        failed = self.rng.random() < s.error_rate if s.error_rate else False
        return max(0.0, s.latency_ms + jitter) / 1000.0, failed


class SimServer:
    """The simulator as an aiohttp server: `async with SimServer(cfg) as sim: sim.url`."""

    def __init__(self, config: SimConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.requests: dict[str, int] = {}
        # The Authorization header of each chat request, in order: lets tests see which key reached
        # the upstream (lockgate's provider credential, never the client's lockgate key).
        self.authorizations: list[str | None] = []
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
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/metrics", metrics.serve_prometheus)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
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

    async def _list_models(self, request: web.Request) -> web.Response:
        data = [{"id": n, "object": "model", "created": self._created, "owned_by": "lockgate-sim"}
                for n in self._models]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.authorizations.append(request.headers.get("Authorization"))
        try:
            body = decode_request(await request.read())
        except msgspec.ValidationError as exc:
            return _error(400, f"invalid request: {exc}", "invalid_request_error")
        except msgspec.DecodeError:
            return _error(400, "request body is not valid JSON", "invalid_request_error")
        if not body.messages:
            return _error(400, "'messages' must be a non-empty list", "invalid_request_error")
        model = self._models.get(body.model)
        if model is None:
            return _error(404, f"The model '{body.model}' does not exist", "invalid_request_error", "model_not_found")
        self.requests[model.name] = self.requests.get(model.name, 0) + 1
        delay, failed = model.draw()
        prompt_text = " ".join(text_of(m.content) for m in body.messages)
        answer = model.answers.get((last_user_text(body.messages) or "").strip(), model.spec.default)
        finish = "stop"
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None and max_tokens > 0:
            words = answer.split()
            limit = max(1, int(max_tokens / 1.3))
            if len(words) > limit:
                answer, finish = " ".join(words[:limit]), "length"
        usage = {
            "prompt_tokens": count_tokens(prompt_text),
            "completion_tokens": count_tokens(answer),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        logprob = model.spec.logprob if body.logprobs is True else None
        meta = {"id": "chatcmpl-" + uuid7().replace("-", "")[:24], "created": int(time.time()), "model": model.name}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return await self._stream(request, model, meta, answer, finish, usage, delay, failed, include_usage,
                                      logprob)
        if delay:
            await asyncio.sleep(delay)
        if failed:
            return _error(500, "The simulated server had an error processing your request", "server_error")
        return web.json_response({
            **meta,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "logprobs": None if logprob is None else _logprobs(_pieces(answer), logprob),
                         "finish_reason": finish}],
            "usage": usage,
        })

    async def _stream(
        self,
        request: web.Request,
        model: _Model,
        meta: dict[str, Any],
        answer: str,
        finish: str,
        usage: dict[str, int],
        delay: float,
        failed: bool,
        include_usage: bool,
        logprob: float | None = None,
    ) -> web.StreamResponse:
        ttft = model.spec.ttft_ms / 1000.0
        if ttft:
            await asyncio.sleep(ttft)
        if failed:
            return _error(500, "The simulated server had an error processing your request", "server_error")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        pieces = _pieces(answer)
        # the rest of the latency is spread over the tokens after the first
        gap = max(0.0, delay - ttft) / max(1, len(pieces) - 1) if len(pieces) > 1 else 0.0

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            chunk = {**meta, "object": "chat.completion.chunk", "choices": choices, **extra}
            await resp.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")

        await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for i, piece in enumerate(pieces):
            if i and gap:
                await asyncio.sleep(gap)
            choice: dict[str, Any] = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
            if logprob is not None:
                choice["logprobs"] = _logprobs([piece], logprob)
            await send([choice])
        await send([{"index": 0, "delta": {}, "finish_reason": finish}])
        if include_usage:
            await send([], usage=usage)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 9000) -> None:
    """Run the simulator until cancelled (used by `python -m lockgate_dev.sim`)."""
    async with SimServer(config, host, port) as sim:
        print(f"lockgate simulator (not a real model) serving {', '.join(config.models)} at {sim.url}", flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m lockgate_dev.sim [--config sim.yaml] [--port 9000]`."""
    parser = argparse.ArgumentParser(description="Simulated OpenAI-compatible upstream (for demos and tests).")
    parser.add_argument("--config", help="YAML with `models:` and `seed:`; default: one model 'sim-model'")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    config = load_config(args.config) if args.config else SimConfig(models={"sim-model": ModelSpec()})
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, args.host, args.port))


if __name__ == "__main__":
    main()
