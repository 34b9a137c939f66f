"""What an eval run ran on, so it can be reproduced: interpreter, lockgate and package versions, host and
hardware, seeds, and the model, endpoint and parameters it called.

`host()` is read once per process (hashing the installed packages walks site-packages); `for_run` is
pure and adds what belongs to one run. Values are strings: the map is stored as a column of `eval_runs`. The
evaluator also registers it as an artifact of kind `environment` (its canonical JSON, content-addressed like every
artifact), and the run's map carries that artifact's hash under `hash` (HASH_KEY).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lockgate import __version__
from lockgate.ids import canonical_json

# The evaluator's resampling is seeded with 0 everywhere (stats.py, calibration.py): the same cases give
# the same intervals. Recorded so a rerun can check it used the same.
BOOTSTRAP_SEED = 0
# Requests to the model under test are sent with temperature 0 (runner.py).
TEMPERATURE = 0
# The entry of a run's environment that holds the content hash of the rest: its `environment` artifact.
HASH_KEY = "hash"


def packages_hash() -> tuple[str, int]:
    """sha256 over the sorted `name==version` of every installed distribution, and how many there are."""
    pins = sorted({f"{(d.metadata['Name'] or '').lower()}=={d.version}" for d in importlib.metadata.distributions()})
    return "sha256:" + hashlib.sha256("\n".join(pins).encode()).hexdigest(), len(pins)


def lock_hash(start: Path | None = None) -> str:
    """sha256 of the project's uv.lock when this install runs from a checkout that has one, else ""."""
    here = start or Path(__file__).resolve()
    for folder in here.parents:
        lock = folder / "uv.lock"
        if lock.is_file():
            return "sha256:" + hashlib.sha256(lock.read_bytes()).hexdigest()
    return ""


def _gpu() -> str:
    if shutil.which("nvidia-smi") is not None:
        return "nvidia"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return f"cuda:{visible}" if visible else "none"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo"), system: str | None = None) -> str:
    """The CPU's model name: /proc/cpuinfo's `model name` on Linux, else what `platform.processor()` says, else the
    architecture (all some hosts report, an ARM Linux's cpuinfo among them)."""
    if (system or platform.system()) == "Linux":
        try:
            text = cpuinfo.read_text(errors="replace")
        except OSError:
            text = ""
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return " ".join(value.split())
    return platform.processor() or platform.machine()


@functools.cache
def host() -> dict[str, str]:
    """This process's interpreter, packages and hardware."""
    pkgs, n = packages_hash()
    return {
        "python": platform.python_version(), "python_implementation": platform.python_implementation(),
        "lockgate": __version__, "packages_sha256": pkgs, "packages": str(n), "lock_sha256": lock_hash(),
        "os": f"{platform.system()} {platform.release()}", "platform": platform.platform(),
        "machine": platform.machine(), "cpu": cpu_model(),
        "cpu_count": str(os.cpu_count() or 0), "gpu": _gpu(), "executable": sys.executable,
    }


def for_run(host_env: Mapping[str, str], *, model: str, endpoint: str, params: Mapping[str, Any] | None,
            suite: str, dataset: str, repeats: int, concurrency: int, timeout_s: float, cache: bool) -> dict[str, str]:
    """The environment of one run: the host's, plus what it called and how (pure)."""
    sampling = {"temperature": TEMPERATURE, **(params or {})}
    return {**host_env, "model": model, "endpoint": endpoint, "sampling": canonical_json(sampling).decode(),
            "seed": str(BOOTSTRAP_SEED), "suite": suite, "dataset": dataset, "repeats": str(repeats),
            "concurrency": str(concurrency), "timeout_s": f"{timeout_s:g}", "cache": str(cache).lower()}


def content(env: Mapping[str, str]) -> dict[str, str]:
    """What a run's `environment` artifact holds: the run's environment without its own hash."""
    return {k: v for k, v in env.items() if k != HASH_KEY}


def digest(env: Mapping[str, str]) -> str:
    """The content hash of an environment (what its `environment` artifact is registered under): of its `content`,
    so a stored run's map gives back the hash it carries."""
    return "sha256:" + hashlib.sha256(canonical_json(content(env))).hexdigest()


def artifact_name(env_digest: str) -> str:
    """The name a run's environment is registered under: from its hash, so one environment is one artifact."""
    return "env-" + env_digest.removeprefix("sha256:")[:16]
