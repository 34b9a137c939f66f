"""Documents under the home that commands read, change and write back (`apikeys.json`, the trust file), one
change at a time.

A writer holds `locked(path)` from before it reads the document until it has replaced it, and reads it under the
lock: two commands at once (`keys create` while `keys revoke` runs, `gate trust` while `gate revoke` runs) otherwise
each replace the document the other read, and one change is lost with both saying they succeeded (probe p37 F5).
Readers take no lock: `replace` writes a document whole (a temporary file renamed over it), so a reader sees the old
one or the new one, never half of either.

The lock is an `flock` on a file beside the document (`.NAME.lock`, 0600), released by the kernel when its holder
closes it or dies however it dies. The file stays: removed, a writer waiting on it would hold a lock of a file the
next writer no longer opens.
"""

from __future__ import annotations

import contextlib
import fcntl  # POSIX only, as the home's services and CLI are
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the lock of the document at `path` (waiting for another writer to be done with it)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def replace(path: Path, data: bytes) -> None:
    """Write `data` as the whole of `path` (0600): a reader sees the document before or after, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
