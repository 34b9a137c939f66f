"""HOME/stack.json: where the stack `lockgate up` runs from HOME listens, for the CLI to find it.

`up --nats-port 0` (or any port but the default) binds ports no other command is told; the file names
them while the stack runs, so `lockgate --home HOME status` (or `rollout`, `sql`, ...) reaches that stack
without `--nats` and `--router`. An explicit `--nats`/`--router` (or its environment variable) always wins.
The file holds addresses only, never a credential; one left by a stack killed with -9 names a process that
no longer runs and is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

FILE = "stack.json"


def write(home: str, endpoints: dict[str, str]) -> None:
    """Record this process's endpoints under `home` (replacing a previous stack's)."""
    path = Path(home) / FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "endpoints": endpoints}, indent=2) + "\n")
    tmp.replace(path)  # whole or not at all: a CLI reading meanwhile never sees half a file


def remove(home: str) -> None:
    """Forget the endpoints, if this process wrote them."""
    path = Path(home) / FILE
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


def endpoints(home: str) -> dict[str, str]:
    """The endpoints of the stack running from `home`; empty if none runs (no file, a stale or unreadable one)."""
    found = _live(home)
    return {} if found is None else found[1]


def owner(home: str) -> int | None:
    """The process id of the stack running from `home`, None if none runs: a second `up` on the same home is
    refused with it before it opens anything (chDB's data path and JetStream's store belong to one process)."""
    found = _live(home)
    return None if found is None else found[0]


def _live(home: str) -> tuple[int, dict[str, str]] | None:
    try:
        doc = json.loads((Path(home) / FILE).read_text())
        pid, found = int(doc["pid"]), doc["endpoints"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _alive(pid) or not isinstance(found, dict):
        return None
    return pid, {str(k): str(v) for k, v in found.items()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True
