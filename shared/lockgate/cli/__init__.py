"""The `lockgate` command (needs `lockgate[server]`; a plain install carries only the SDK)."""

from __future__ import annotations

import sys


def main() -> None:
    """Console entry point; says what to install when the server extra is missing."""
    try:
        from lockgate.cli.main import main as run
    except ModuleNotFoundError as exc:
        sys.stderr.write(f"error: the lockgate command needs the server extra ({exc.name} is missing): "
                         "pip install 'lockgate[server]'\n")
        sys.exit(2)
    run()


__all__ = ["main"]
