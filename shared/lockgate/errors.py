"""One error root. Each condition is a subclass with a fixed, helpful message."""

from __future__ import annotations


class LockgateError(Exception):
    """Root of every error lockgate raises on purpose."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(LockgateError):
    """A setting, URL or file given by the user is wrong."""

    exit_code = 2


class PortInUse(ConfigError):
    """A port lockgate is told to listen on is another process's: `what` listens there, chosen with `flag`."""

    def __init__(self, what: str, port: int, flag: str) -> None:
        super().__init__(f"{what} port {port} is in use (another lockgate stack?): choose another with {flag}, or 0 "
                         "for a free one")
        self.what, self.port, self.flag = what, port, flag


class InvalidEvent(LockgateError):
    """A message could not be decoded into a known contract (goes to the DLQ)."""


class UnreadableBody(InvalidEvent):
    """An HTTP request's body cannot be read as sent: a corrupt gzip or deflate stream, or cut short."""

    http_status = 400


class BodyTooLarge(UnreadableBody):
    """An HTTP request's body (decompressed) is larger than the endpoint accepts."""

    http_status = 413


class InvalidName(InvalidEvent):
    """A tenant, app, deployment or release name breaks the name grammar (lockgate.contracts.names)."""

    exit_code = 2  # invalid input, as README's "Exit codes" says of a name


class FieldTooLong(InvalidEvent):
    """A document made here has a text, list or map longer than its contract allows (lockgate.contracts.bounds):
    refused before it is published, as every consumer would refuse (dead-letter) it."""

    exit_code = 2  # invalid input


class UnknownSchemaVersion(InvalidEvent):
    """An event declares a schema_version this build does not understand."""


class Retryable(LockgateError):
    """A transient failure: the message is nacked with backoff and redelivered."""


class StoreUnavailable(Retryable):
    """ClickHouse could not be reached or refused the write."""


class RowsRefused(LockgateError):
    """ClickHouse refused the rows themselves (a value out of range, a type mismatch): retrying the
    same rows cannot help, so the message holding them is dead-lettered (alone: a batch that fails
    this way is retried message by message)."""


class BusUnavailable(Retryable):
    """NATS could not be reached or JetStream did not acknowledge."""


class BusUnreachable(BusUnavailable):
    """Nothing answers a first connection at the NATS URL (refused, or no greeting in time): no stack runs there, or
    its bus is restarting or hung. `reason` says which of those the connection saw."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class CutOff(BusUnavailable):
    """A decisions watch whose NATS connection answered nothing for longer than its bound (`router_cut_off_s`): a
    silent partition hides every decision made meanwhile, so the watch ends rather than leave its caller acting on
    the last one it yielded."""


class StoreNotCreated(BusUnavailable):
    """nats-server failed to create a stream's or bucket's store (full or unwritable disk, too many open files)."""


class BusClosed(BusUnavailable):
    """NATS closed a connection for good (a protocol error, after which nats-py never reconnects): every
    subscription and consumer on it is gone, so the process ends and its supervisor starts it again."""


class PayloadTooLarge(LockgateError):
    """A message larger than the NATS server's max_payload: the same bytes are refused every time, so it is
    not retried (split what it carries into smaller messages)."""


class ClientClosed(LockgateError):
    """An SDK client used after close(): a Client is started once; make a new one."""


class NotFound(LockgateError):
    """A release, artifact, trace or decision asked for does not exist."""

    exit_code = 3


class ArtifactCorrupt(NotFound):
    """The bytes stored under an artifact's hash are not that content (altered in the object store): every
    reader refuses them as if the artifact were absent, since what the hash names is not there."""

    exit_code = 4  # as a signature that does not verify: tampering found


class OriginalAltered(NotFound):
    """The bytes a dead letter's original is stored under are not the ones its name's sha256 says (altered in the
    bucket, which every service may write to): they are not shown, as if the original were gone."""

    exit_code = 4  # as a signature that does not verify: tampering found


class UpstreamError(LockgateError):
    """An upstream LLM endpoint failed or answered something unusable."""


class PolicyError(ConfigError):
    """A policy file is malformed."""


class SignatureError(LockgateError):
    """A signature is missing, malformed or does not verify."""

    exit_code = 4


class AmbiguousReference(LockgateError):
    """A hash prefix matches more than one artifact."""


class UnknownDimension(ConfigError):
    """A cost rollup was asked to group by something not in the allow-list."""


class QueryUnavailable(Retryable):
    """No query service answered on the bus (not started yet, or too busy to reply in time)."""


class QueryRefused(ConfigError):
    """Operator SQL that is not one read-only statement over lockgate's tables (it is never run)."""


class ReplyTooLarge(LockgateError):
    """A query's result does not fit in one NATS message; ask for fewer rows."""


class PublishFailed(BusUnavailable):
    """JetStream did not acknowledge some events even after retries; `sent` of them were published. `failed` counts
    those not acknowledged, of which `unconfirmed` were sent and their acknowledgement never came: those may be
    stored (a re-send of the same events is deduplicated)."""

    def __init__(self, message: str, *, sent: int, failed: int, unconfirmed: int = 0) -> None:
        super().__init__(message)
        self.sent = sent
        self.failed = failed
        self.unconfirmed = unconfirmed


class ReleaseConflict(LockgateError):
    """A release name is already bound to other content; releases are immutable, register a new name."""


class AuditBroken(LockgateError):
    """The audit log's hash chain has a missing, altered or unsigned row (`lockgate audit verify`)."""

    exit_code = 4  # as `gate verify` on a bad signature: tampering found


class UnreadableValue(LockgateError):
    """A KV key holds something that is not what its bucket stores (JetStream answers requests and publishes on
    any reply subject a requester names, a `$KV.` key's included): refused, never read as absent."""
