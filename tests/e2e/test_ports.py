"""`lockgate up`, `dev up` and `sim` told a port another process listens on, or a home a stack runs from:
one line naming it and what to do, exit 2, before anything starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lockgate import credentials
from lockgate.server.apikeys import bootstrap
from lockgate.server.natsserver import NatsServer

pytestmark = pytest.mark.timeout(120)

LOCKGATE = [sys.executable, "-m", "lockgate.cli.__main__"]
FREE = {"--nats-port": "0", "--router-port": "0", "--grpc-port": "0", "--otlp-grpc-port": "0",
        "--otlp-http-port": "0"}


def lockgate(*args: str) -> subprocess.CompletedProcess[str]:
    # A refusal takes a second or two; a stack that starts instead runs until this timeout ends the test.
    return subprocess.run([*LOCKGATE, *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"},
                          timeout=60)


@pytest.fixture
def taken() -> Iterator[int]:
    """A port another stack listens on: with SO_REUSEPORT, as its gRPC servers did, so that a gRPC server that
    sets it too (gRPC's default) may listen there as well."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def _ports(flag: str, port: int, **more: str) -> list[str]:
    return [arg for name, value in (FREE | {flag: str(port)} | more).items() for arg in (name, value)]


@pytest.mark.parametrize(("flag", "what"), [
    ("--nats-port", "NATS"), ("--router-port", "router"), ("--grpc-port", "gRPC"),
    ("--otlp-grpc-port", "OTLP/gRPC"), ("--otlp-http-port", "OTLP/HTTP"),
])
def test_up_refuses_a_port_another_stack_listens_on(tmp_path: Path, taken: int, flag: str, what: str) -> None:
    # Before: --grpc-port and --otlp-grpc-port started "cleanly" and shared the port (the kernel split the
    # connections between the stacks); --router-port was an OSError traceback, --nats-port ten lines of its log.
    out = lockgate("up", "--home", str(tmp_path), *_ports(flag, taken))
    assert (out.returncode, out.stderr) == (2, f"error: {what} port {taken} is in use (another lockgate stack?): "
                                               f"choose another with {flag}, or 0 for a free one\n"), out.stdout
    assert not (tmp_path / "nats").exists()  # refused before anything started


def test_up_names_every_taken_port_in_one_refusal(tmp_path: Path, taken: int) -> None:
    # Before (probe p30), beside another stack each try named the next taken port: six tries to start.
    with socket.socket() as second:
        second.bind(("127.0.0.1", 0))
        second.listen()
        other = second.getsockname()[1]
        out = lockgate("up", "--home", str(tmp_path), *_ports("--nats-port", taken, **{"--grpc-port": str(other)}))
    assert (out.returncode, out.stderr) == (2, f"error: NATS port {taken}, gRPC port {other} are in use (another "
                                               "lockgate stack?): choose others, or 0 for free ones: --nats-port 0 "
                                               "--grpc-port 0\n"), out.stdout
    assert not (tmp_path / "nats").exists()


def test_dev_up_and_sim_refuse_the_simulators_port_by_its_option(tmp_path: Path, taken: int) -> None:
    out = lockgate("dev", "up", "--home", str(tmp_path), *_ports("--sim-port", taken))
    assert (out.returncode, out.stderr) == (2, f"error: simulator port {taken} is in use (another lockgate stack?): "
                                               "choose another with --sim-port, or 0 for a free one\n"), out.stdout
    out = lockgate("sim", "--port", str(taken))  # before: an OSError traceback
    assert (out.returncode, out.stderr) == (2, f"error: simulator port {taken} is in use (another lockgate stack?): "
                                               "choose another with --port, or 0 for a free one\n"), out.stdout


def test_a_number_that_is_no_port_is_a_usage_error() -> None:
    out = lockgate("sim", "--port", "-1")  # before: an OverflowError traceback
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "Invalid value for '--port': -1 is not in the range 0<=x<=65535." in out.stderr


@pytest.mark.parametrize("command", [["up"], ["dev", "up", "--sim-port", "0"]])
def test_up_refuses_a_home_a_stack_runs_from(tmp_path: Path, command: list[str]) -> None:
    # What a running `up` writes in its home, naming its live process (this one stands in for it).
    (tmp_path / "stack.json").write_text(json.dumps({"pid": os.getpid(), "endpoints": {}}))
    out = lockgate(*command, "--home", str(tmp_path), *_ports("--nats-port", 0))
    # Before: chDB's "Cannot lock file .../clickhouse/status" and "cannot open ClickHouse ..." errors.
    assert (out.returncode, out.stderr) == (2, f"error: a stack is already running from {tmp_path} (pid "
                                               f"{os.getpid()}): stop it first, or give another --home\n"), out.stdout
    assert not (tmp_path / "nats").exists()


def test_make_run_passes_args_and_gives_its_advice_in_their_form(tmp_path: Path, taken: int) -> None:
    # `make run ARGS=...` reaches `dev up` (`-o setup`: the venv is this one, not synced again). Before, make took
    # no options and a taken port's advice, "choose another with --router-port", was one it could not pass.
    root = Path(__file__).parents[2]
    args = " ".join(["--home", str(tmp_path), *_ports("--router-port", taken, **{"--sim-port": "0"})])
    out = subprocess.run(["make", "-s", "-C", str(root), "-o", "setup", "run", f"ARGS={args}"], capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "300"}, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    # The advice keeps the ARGS given (probe p30: it dropped --home, and the next try met the first stack's home).
    assert out.stderr.startswith(f"error: router port {taken} is in use (another lockgate stack?): choose another "
                                 f'with --router-port, or 0 for a free one (with make: make run ARGS="{args} '
                                 '--router-port 0")\n'), out.stderr
    assert not (tmp_path / "nats").exists()
    # Without ARGS, `make run` is the command it always was.
    dry = subprocess.run(["make", "-s", "-n", "-C", str(root), "-o", "setup", "run"], capture_output=True, text=True,
                         timeout=60)
    assert dry.stdout.split() == [".venv/bin/lockgate", "dev", "up", "--demo"], dry.stdout


@pytest.mark.parametrize("where", [["--home", "HOME", "demo"], ["demo", "--home", "HOME"]])
def test_demo_calls_the_router_the_homes_stack_serves(tmp_path: Path, nats_server: NatsServer, unique: str,
                                                      where: list[str]) -> None:
    # Before (probe p11), `--home H demo` against a stack on other ports took NATS from H/stack.json but called the
    # router at 127.0.0.1:8080: it registered and evaluated, then died in aiohttp's traceback.
    credentials.ensure(tmp_path)
    bootstrap(str(tmp_path))  # the API keys `up` makes
    with socket.socket() as closed:  # bound, never listening: this stack's router does not answer
        closed.bind(("127.0.0.1", 0))
        router = f"http://127.0.0.1:{closed.getsockname()[1]}"
        (tmp_path / "stack.json").write_text(json.dumps({"pid": os.getpid(), "endpoints": {
            "nats": nats_server.url, "router": router, "simulator": "http://127.0.0.1:1/v1  (simulated LLM upstream)"}}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKGATE_")} | {"LOCKGATE_PREFIX": unique}
        out = subprocess.run([*LOCKGATE, *(str(tmp_path) if a == "HOME" else a for a in where), "--traffic", "10"],
                             capture_output=True, text=True, env=env | {"COLUMNS": "300"}, timeout=60)
    assert (out.returncode, out.stderr) == (1, f"error: the router at {router} did not answer the demo (Connection "
                                               "refused); pass --router URL (as `lockgate dev up` printed it), or "
                                               "--home of the stack\n"), out.stdout
    assert out.stdout == ""  # before anything was registered
