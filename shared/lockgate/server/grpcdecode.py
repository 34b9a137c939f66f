"""How lockgate's gRPC servers take a request: the key first, then its bytes decoded, and a refusal that keeps nothing.

Every gRPC server of lockgate installs `Requests` (tls.grpc_server), which does three things grpc.aio does not:

- A method that decodes its request (the gRPC API's) is given the request's bytes instead: `admit` looks at the
  call's metadata (its API key) and refuses the call before a byte is decoded; only then are the bytes decoded, in
  the server's threads (`work`, an OffLoop) when large. (Before, probe p62 F1: grpc.aio decoded a request on the
  event loop the embedded router shares before any key was looked at: a 4 MiB `Ingest/Send` of empty events cost
  0.36 s of the loop and about 840 MB, for an UNAUTHENTICATED.) The OTLP receiver's `Export` takes its bytes and
  checks its key itself (services/otlp/transports.py).
- A request that does not decode is the caller's mistake: INVALID_ARGUMENT saying why (grpc.aio answered UNKNOWN
  "Unexpected <class 'DecodeError'>"), as the HTTP transports answer 400.
- An abort lets go of the request (`_forget`). grpc.aio keeps the AbortError on the call's state, and the error's
  traceback reaches that state again through the servicer context in each frame it passed: a cycle, holding every
  local of those frames (the request's bytes, the decoded request), that only a full garbage collection frees, which
  lockgate makes rare (`fewer_collections`). (Before, probe p62 F3: unauthenticated 16 MB OTLP exports, one at a
  time, took the process from 645 MB to 5.8 GB, and it stayed.)
"""

from __future__ import annotations

import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from lockgate.errors import BusUnavailable
from lockgate.server.offloop import OffLoop

# A request this large or larger is decoded in the server's threads; a smaller one costs less than the hop.
INLINE_BYTES = 64 * 1024

Admit = Callable[[str, grpc.aio.ServicerContext], Awaitable[None]]


class _Undecodable:
    """What a request became when it did not decode: the reason, for the answer."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, ValueError) as exc:
            return _Undecodable(str(exc))
    return decode


def _forget(exc: BaseException) -> None:
    """Clear the locals of the frames `exc` (and the errors it arose from) passed through, which have finished."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__context__


class Requests(grpc.aio.ServerInterceptor):
    """As the module says; without `admit`, a method's request is decoded before any key is looked at."""

    def __init__(self, admit: Admit | None = None, work: OffLoop | None = None) -> None:
        self.admit = admit
        self.work = work

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        """The method's handler, taking its request as the module says."""
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        deserialize = handler.request_deserializer
        take = self._taker(method, deserialize)
        raw = take is not None  # the handler is given bytes, decoded by `take`
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    if take is not None:
                        request = await take(request, context)
                    return await unary(request, context)
                except grpc.aio.AbortError as exc:
                    request = context = None  # nor this frame, which the traceback ends with
                    _forget(exc)
                    raise

            return grpc.unary_unary_rpc_method_handler(call, request_deserializer=None if raw else deserialize,
                                                       response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            streaming = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    if take is not None:
                        request = await take(request, context)
                    async for item in streaming(request, context):
                        yield item
                except grpc.aio.AbortError as exc:
                    request = context = None
                    _forget(exc)
                    raise

            return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=None if raw else deserialize,
                                                        response_serializer=handler.response_serializer)
        return handler  # client-streaming methods: lockgate serves none

    def _taker(self, method: str, deserialize: Callable[[bytes], Any] | None
               ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]] | None:
        """How the method's bytes become its request (None: the handler is given what grpc.aio gives it)."""
        if deserialize is None:
            return None
        decode, admit, work, name = _lenient(deserialize), self.admit, self.work, method.rsplit("/", 1)[-1]

        async def take(body: bytes, context: grpc.aio.ServicerContext) -> Any:
            if admit is not None:
                await admit(method, context)  # aborts a call it refuses: its bytes are never decoded
            if work is None or len(body) < INLINE_BYTES:
                request = decode(body)
            else:
                try:
                    async with work.slot():
                        request = await work.run(lambda: decode(body))
                except BusUnavailable as exc:  # Busy: every slot is taken
                    await context.abort(grpc.StatusCode.UNAVAILABLE, exc.message)
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a valid {name} request: {request.reason}")
            return request

        return take
