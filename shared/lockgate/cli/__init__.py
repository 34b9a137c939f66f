"""The `lockgate` command."""

from lockgate.cli.main import main

__all__ = ["main"]
