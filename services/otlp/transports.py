"""OTLP's two transports over one Receiver: gRPC (`TraceService/Export`) and HTTP (`POST /v1/traces`).

Errors are answered as the OTLP spec says, so standard exporters do the right thing by themselves:
a bad key is UNAUTHENTICATED / 401 and another tenant's span PERMISSION_DENIED / 403 (never
retried); a bus that does not acknowledge is UNAVAILABLE / 503 with a retry delay (`RetryInfo`,
`Retry-After`), which exporters wait for before sending the same request again.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import grpc
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import DESCRIPTOR, ExportTraceServiceResponse

from lockgate.errors import BusUnavailable, InvalidEvent, LockgateError, UnreadableBody
from lockgate.server.apikeys import AuthError, Forbidden
from lockgate.server.body import closing, read_body
from lockgate.server.httpguard import HttpLimits
from lockgate.server.tls import bind_grpc, grpc_server
from lockgate.services.otlp import wire
from lockgate.services.otlp.bodies import BodySlots
from lockgate.services.otlp.ingest import Receiver

log = logging.getLogger("lockgate.otlp")

MAX_REQUEST_BYTES = 16 * 1024 * 1024  # the Collector's default limit for one OTLP request
SERVICE = DESCRIPTOR.services_by_name["TraceService"].full_name  # opentelemetry.proto.collector.trace.v1.TraceService
EXPORT = "Export"


class TraceService:
    """OTLP/gRPC: the caller's API key in `authorization: Bearer ...` or `x-api-key` metadata.

    `Export` takes the request's bytes (`handler`), parsed once its key is accepted, and off the event loop as
    OTLP/HTTP's: grpc.aio parsed a request on the loop the embedded router shares before any key was
    looked at, so anyone who could connect stalled it (about 0.17 s a 15 MB export) for an UNAUTHENTICATED.
    Its aborts keep nothing of the bytes (grpcdecode.Requests, which every lockgate gRPC server installs)."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def Export(self, body: bytes, context: grpc.aio.ServicerContext) -> Any:
        """Store the request's spans (and inference events); OTLP's status codes on failure."""
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        try:
            key = self.receiver.authenticate(metadata)
            # Worded as lockgate's gRPC servers answer a request that does not decode (grpcdecode.py).
            return await self.receiver.export(key, functools.partial(wire.request_from_protobuf, body,
                                                                     f"a valid {EXPORT} request"))
        except AuthError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)
        except Forbidden as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, exc.message)
        except InvalidEvent as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        except BusUnavailable as exc:
            delay = self.receiver.retry_after_s
            details = wire.status(wire.UNAVAILABLE, exc.message, delay).SerializeToString()
            # The status details in gRPC's standard trailer, and the RetryInfo alone under the key the
            # OpenTelemetry Python exporter reads.
            await context.abort(grpc.StatusCode.UNAVAILABLE, exc.message, trailing_metadata=(
                ("grpc-status-details-bin", details),
                ("google.rpc.retryinfo-bin", wire.retry_info(delay).SerializeToString())))
        except LockgateError as exc:
            log.warning("OTLP export failed: %s", exc.message)
            await context.abort(grpc.StatusCode.INTERNAL, exc.message)


class HttpApp:
    """OTLP/HTTP on `POST /v1/traces`, binary protobuf or JSON, gzip or not; the answer in the
    request's encoding. The key in `Authorization: Bearer ...` or `x-api-key`."""

    def __init__(self, receiver: Receiver, limits: HttpLimits, slots: BodySlots | None = None) -> None:
        self.receiver = receiver
        self.slots = slots or BodySlots()  # the bodies being received, a share of them each tenant's
        self.limits = limits  # how long and how slowly a body may arrive (`read_body`)

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_post("/v1/traces", self.traces)
        return app

    def _error(self, http: int, code: int, message: str, content_type: str, *,
               retry_after_s: float | None = None) -> web.Response:
        body = wire.encode_message(wire.status(code, message, retry_after_s), content_type)
        headers = {"Retry-After": str(math.ceil(retry_after_s))} if retry_after_s is not None else None
        return web.Response(status=http, body=body, content_type=content_type, headers=headers)

    async def traces(self, request: web.Request) -> web.Response:
        """One OTLP/HTTP trace export."""
        content_type = request.content_type
        if content_type not in (wire.PROTOBUF, wire.JSON):
            return self._error(415, wire.INVALID_ARGUMENT,
                               f"unsupported Content-Type {content_type!r}: send {wire.PROTOBUF} or {wire.JSON}",
                               wire.JSON)
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            # The key first: a request without one is answered before its body is read, and holds no slot.
            key = self.receiver.authenticate(headers)
            busy = self.slots.refusal(key.tenant)
            if busy is not None:  # answered before the body is read: the connection closes with it
                return closing(self._error(503, wire.UNAVAILABLE, busy, content_type,
                                           retry_after_s=self.receiver.retry_after_s))
            with self.slots.holding(key.tenant):
                body = await read_body(request, self.limits)
                parse = wire.request_from_json if content_type == wire.JSON else wire.request_from_protobuf
                # Parsed by the receiver, off the event loop (OTLP/JSON's parser takes seconds for 16 MiB).
                reply = await self.receiver.export(key, functools.partial(parse, body))
        except AuthError as exc:
            return self._error(401, wire.UNAUTHENTICATED, exc.message, content_type)
        except Forbidden as exc:
            return self._error(403, wire.PERMISSION_DENIED, exc.message, content_type)
        except UnreadableBody as exc:
            return closing(self._error(exc.http_status, wire.INVALID_ARGUMENT, exc.message, content_type))
        except InvalidEvent as exc:
            return self._error(400, wire.INVALID_ARGUMENT, exc.message, content_type)
        except BusUnavailable as exc:
            return self._error(503, wire.UNAVAILABLE, exc.message, content_type,
                               retry_after_s=self.receiver.retry_after_s)
        except LockgateError as exc:
            log.warning("OTLP export failed: %s", exc.message)
            return self._error(500, wire.INTERNAL, exc.message, content_type)
        return web.Response(body=wire.encode_message(reply, content_type), content_type=content_type)


def handler(service: TraceService) -> grpc.GenericRpcHandler:
    """`TraceService/Export` with no request deserializer: the servicer is given the bytes."""
    export = grpc.unary_unary_rpc_method_handler(service.Export, request_deserializer=None,
                                                 response_serializer=ExportTraceServiceResponse.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, {EXPORT: export})


async def serve_grpc(receiver: Receiver, host: str, port: int, credentials: grpc.ServerCredentials | None = None
                     ) -> tuple[grpc.aio.Server, int]:
    """Start the OTLP/gRPC server; (server, port bound)."""
    server = grpc_server(options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
    server.add_generic_rpc_handlers((handler(TraceService(receiver)),))
    bound = await bind_grpc(server, host, port, credentials, what="OTLP/gRPC", flag="--otlp-grpc-port")
    await server.start()
    return server, bound
