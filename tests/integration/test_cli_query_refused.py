"""The CLI's query commands (`decisions`, `sql`, `traces`, `audit log`, `rollout history`, `lineage`) as a user runs
them, from their entry point, against the embedded runtime as `lockgate up` runs it: a NATS user the server refuses
the query subject is told so at once, and Ctrl-C while the query service has not answered ends the command."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator

import pytest

from lockgate import credentials
from lockgate.config import Settings
from lockgate.permissions import query_subject
from lockgate.server.runtime import Runtime
from lockgate.subjects import Subjects

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Runtime]:
    # No query service: the test answers (or leaves unanswered) the CLI's requests itself.
    runtime = Runtime(settings.replace(nats_url="nats://127.0.0.1:0"), services=["sink"])
    await runtime.start()
    yield runtime
    await runtime.stop()


def cli_env(runtime: Runtime, **extra: str) -> dict[str, str]:
    s = runtime.settings
    env = {**os.environ, "LOCKGATE_HOME": s.home, "LOCKGATE_NATS_URL": s.nats_url, "LOCKGATE_PREFIX": s.prefix}
    for name in ("LOCKGATE_ROLE", "LOCKGATE_NATS_USER", "LOCKGATE_NATS_PASSWORD", "LOCKGATE_NATS_CREDS",
                 "LOCKGATE_CLICKHOUSE_URL"):
        env.pop(name, None)
    return {**env, **extra}


async def lockgate(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "lockgate.cli", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def test_a_user_refused_the_query_subject_is_told_at_once_naming_user_and_subject(stack: Runtime) -> None:
    # Probe p11 F4: with LOCKGATE_NATS_USER=app every query command waited ~37 s, then said the query service did not
    # answer (exit 1): nats-server's refusal of the publish came as an -ERR the CLI's connection dropped. The query
    # subject has a subscriber here, so nothing but the refusal can end the wait before the query's 30 s.
    s = stack.settings
    subject = query_subject(Subjects(s.prefix), "viewer")
    listening = await stack.ctx.bus.nc.subscribe(subject)
    app = credentials.for_identity(s, "app")
    env = cli_env(stack, LOCKGATE_NATS_USER=app.user, LOCKGATE_NATS_PASSWORD=app.password)
    for args, command in ((("decisions", "--json"), "lockgate decisions"), (("sql", "SELECT 1"), "lockgate sql")):
        proc = await lockgate(env, *args)
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        said = err.decode()
        assert proc.returncode == 5, said
        assert "Traceback" not in said and len(said.splitlines()) == 1, said
        assert said.startswith(f"error: 'app' may not run `{command}`: NATS refused it {subject} "
                               "(permissions violation)"), said
        if "--json" in args:
            assert json.loads(out) == {"error": said.removeprefix("error: ").rstrip("\n"), "exit_code": 5}
    assert listening.pending_msgs == 0  # nothing reached the query subject: the server refused it
    await listening.unsubscribe()


async def test_ctrl_c_while_the_query_service_has_not_answered_ends_the_command(stack: Runtime) -> None:
    # Probe p11 F6 saw `sql` run to its timeout after SIGINT: its script started the CLI with `&`, and a background
    # job of a non-interactive shell starts with SIGINT ignored (POSIX). Ctrl-C from a terminal (SIGINT to the
    # foreground group) ends a query at once, 130; so does SIGTERM, which a script can send.
    s = stack.settings
    requests = await stack.ctx.bus.nc.subscribe(query_subject(Subjects(s.prefix), "viewer"))  # never answered
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lockgate.cli", "decisions", env=cli_env(stack), start_new_session=True,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        asked = await requests.next_msg(timeout=60)  # the CLI is waiting for its answer
        assert json.loads(asked.data)["query"] == "decisions"
        os.killpg(proc.pid, sig)
        # Unanswered, the CLI would end after the query's 30 s timeout with exit 1.
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 130, err.decode()
        assert "Traceback" not in err.decode(), err.decode()
    await requests.unsubscribe()
