"""A run's environment: the host's facts plus what the run called, as strings (a ClickHouse map)."""

from __future__ import annotations

import json
from pathlib import Path

from lockgate.provenance import environment


def test_a_run_environment_adds_model_endpoint_sampling_and_seed_to_the_host() -> None:
    env = environment.for_run({"python": "3.11.7"}, model="m", endpoint="http://e", params={"logprobs": True},
                              suite="sha256:s", dataset="sha256:d", repeats=3, concurrency=8, timeout_s=2.5,
                              cache=False)
    assert env["python"] == "3.11.7" and (env["model"], env["endpoint"], env["seed"]) == ("m", "http://e", "0")
    assert json.loads(env["sampling"]) == {"temperature": 0, "logprobs": True}
    assert (env["repeats"], env["timeout_s"], env["cache"]) == ("3", "2.5", "false")
    assert all(isinstance(v, str) for v in env.values())
    assert environment.digest(env) == environment.digest(dict(reversed(env.items())))  # order does not matter


def test_the_host_names_versions_packages_and_hardware(tmp_path: Path) -> None:
    host = environment.host()
    assert {"python", "lockgate", "packages_sha256", "os", "machine", "cpu_count", "gpu"} <= set(host)
    (tmp_path / "uv.lock").write_text("lock")
    assert environment.lock_hash(tmp_path / "pkg" / "mod.py").startswith("sha256:")
