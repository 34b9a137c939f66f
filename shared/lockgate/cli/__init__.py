"""The `lockgate` command (needs `lockgate[server]`; a plain install carries only the SDK)."""

from __future__ import annotations

import sys

try:
    from lockgate.cli.main import main
except ModuleNotFoundError as _missing:  # a plain install: say what to install, not a traceback
    _name = _missing.name

    def main() -> None:
        """Console entry point of a plain install: the command needs the server extra."""
        sys.stderr.write(f"error: the lockgate command needs the server extra ({_name} is missing): "
                         "pip install 'lockgate[server]'\n")
        sys.exit(2)


__all__ = ["main"]
