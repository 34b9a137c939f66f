"""A run's environment: the host's facts plus what the run called, as strings (a ClickHouse map)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from lockgate.ids import content_hash
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


def test_an_environments_hash_is_of_its_content_without_the_hash_it_carries() -> None:
    # A stored run's map carries its `environment` artifact's hash: the map gives that hash back, the artifact
    # holds the map without it, and the artifact's name comes from the hash (one environment, one artifact).
    env = environment.for_run({"python": "3.11.7"}, model="m", endpoint="http://e", params=None, suite="sha256:s",
                              dataset="inline", repeats=1, concurrency=8, timeout_s=30, cache=True)
    digest = environment.digest(env)
    carried = {**env, environment.HASH_KEY: digest}
    assert environment.digest(carried) == digest and environment.content(carried) == env
    assert digest == content_hash(env)  # what `artifacts.register` addresses the content by
    assert environment.artifact_name(digest) == "env-" + digest[7:23]
    assert environment.digest({**env, "model": "other"}) != digest


def test_cpu_is_the_model_name_from_cpuinfo_on_linux_else_what_platform_reports(tmp_path: Path) -> None:
    # Before (probe p29 F9), `cpu` was `platform.processor()`, on Linux the architecture, as `machine`.
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)  Gold 6248 CPU\n"
                    "\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R)  Gold 6248 CPU\n")
    assert environment.cpu_model(info, "Linux") == "Intel(R) Xeon(R) Gold 6248 CPU"
    fallback = platform.processor() or platform.machine()
    info.write_text("processor\t: 0\nCPU part\t: 0xd0c\n")  # an ARM Linux names no model
    assert environment.cpu_model(info, "Linux") == fallback
    assert environment.cpu_model(tmp_path / "missing", "Linux") == fallback
    assert environment.cpu_model(info, "Darwin") == fallback
    assert environment.host()["cpu"] == environment.cpu_model() and environment.host()["machine"] == platform.machine()
