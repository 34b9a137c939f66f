"""`lockgate serve` whose NATS never answers still stops on SIGTERM, in one line, exit 143 (probe
p11): before, it retried for ever, silently, and only SIGKILL ended it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lockgate import credentials


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGTERM])  # SIGINT: not yet (uvloop's runner)
def test_serve_waiting_for_nats_stops_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    credentials.ensure(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKGATE_")}
    proc = subprocess.Popen([sys.executable, "-m", "lockgate.cli", "--home", str(tmp_path),
                             "--nats", "nats://127.0.0.1:1", "serve", "gatekeeper"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # the handlers are installed once it says what it waits for
        assert first.startswith("waiting for NATS at nats://127.0.0.1:1"), first
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + sig
    assert rest.count("\n") == 1 and rest.startswith(f"error: stopped by {sig.name} before gatekeeper started"), rest
