"""What a producer asks the audit log to record (lockgate.auditlog.record): the entry it publishes for the chainer."""

from __future__ import annotations

from typing import Any

import pytest

from lockgate import auditlog
from lockgate.contracts import AuditEntry
from lockgate.subjects import Subjects

pytestmark = pytest.mark.timeout(10)


class Published:
    """A bus that keeps what is published."""

    def __init__(self) -> None:
        self.subjects = Subjects("lg")
        self.sent: list[tuple[str, Any]] = []

    async def publish(self, subject: str, payload: Any) -> None:
        self.sent.append((subject, payload))


async def test_an_entry_is_published_with_its_reason_and_details_scrubbed_of_secrets() -> None:
    # Before (probe p10, F6): a gate decision's reason quoting an eval's error went into the hash-chained log whole,
    # a URL's password included, where it stays for good (a changed row breaks `audit verify`).
    pw = "Pw9xKq2mZt7LrV4n"
    bus = Published()
    entry = await auditlog.record(bus, "gatekeeper", kind="decision", actor="gatekeeper", target="shop-v1",
                                  action="decided", reason=f"eval failed: 'http://evaluser:{pw}@127.0.0.1:1/v1'",
                                  details={"decision": "BLOCK", "note": f"password={pw}", "weight": 5})
    assert bus.sent == [("lg.audit.gatekeeper", entry)] and isinstance(entry, AuditEntry)
    assert entry.reason == "eval failed: 'http://evaluser:[REDACTED]@127.0.0.1:1/v1'"
    assert entry.details == {"decision": "BLOCK", "note": "password=[REDACTED]", "weight": "5"}
