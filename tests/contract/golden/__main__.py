"""`python -m tests.contract.golden NAME [NAME ...] [--force]`: write the golden payloads of new types."""

from __future__ import annotations

import argparse

from tests.contract.golden import write


def main(argv: list[str] | None = None) -> None:
    """Write golden files for the named event types; existing ones only with --force."""
    parser = argparse.ArgumentParser(prog="python -m tests.contract.golden", description=__doc__)
    parser.add_argument("names", nargs="+", metavar="NAME", help="event type name, e.g. InferenceEvent")
    parser.add_argument("--force", action="store_true", help="replace an existing golden (breaks the v1 contract)")
    args = parser.parse_args(argv)
    for name in args.names:
        for path in write(name, force=args.force):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
