"""A gRPC request that does not decode is the caller's mistake: INVALID_ARGUMENT saying why.

grpc.aio decodes a request before any servicer runs, and answers a decode failure (bad UTF-8 in a
string field, a corrupt wire format) with UNKNOWN and "Unexpected <class 'DecodeError'>". The API's
gRPC server installs `DecodeErrors`, which decodes in the server's stead and answers what the API
promises: INVALID_ARGUMENT naming the problem, as the HTTP transports answer 400. (The OTLP receiver
takes an export's bytes and parses them itself, once its key is accepted: services/otlp/transports.py.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


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


async def _refuse(method: str, request: _Undecodable, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a valid {method} request: {request.reason}")


class DecodeErrors(grpc.aio.ServerInterceptor):
    """Answer an undecodable request of a unary or server-streaming method with INVALID_ARGUMENT."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        """The method's handler, decoding its request itself."""
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        decode = _lenient(handler.request_deserializer)
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    return await _refuse(method, request, context)
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(call, request_deserializer=decode,
                                                       response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            streaming = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await _refuse(method, request, context)
                    return
                async for item in streaming(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=decode,
                                                        response_serializer=handler.response_serializer)
        return handler  # client-streaming methods: lockgate serves none
