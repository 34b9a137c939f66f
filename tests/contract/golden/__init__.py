"""Checked-in v1 payloads of every event type, and the generator that writes them for new types.

`<Type>.json` is the encoding of the fully populated instance in `samples.SAMPLES`;
`<Type>.defaults.json` the encoding of the same type built from its required fields alone (the
encoder writes every default, so a changed default shows there). Regenerate only for a NEW type:
`python -m tests.contract.golden TypeName`; an existing golden is the v1 contract and is kept unless
`--force` is given.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from lockgate.codec import encode
from lockgate.contracts import EVENT_TYPES, Event

GOLDEN_DIR = Path(__file__).parent
# Set explicitly even when only required fields are kept: their defaults are drawn per instance.
ALWAYS_SET = ("id", "time")


def paths(name: str) -> tuple[Path, Path]:
    """The fully populated golden file and the defaults golden file of one event type."""
    return GOLDEN_DIR / f"{name}.json", GOLDEN_DIR / f"{name}.defaults.json"


def minimal(sample: Event) -> Event:
    """The same type built from the sample's required fields (plus fixed id and time) only."""
    cls = type(sample)
    keep = {f.name: getattr(sample, f.name) for f in msgspec.structs.fields(cls)
            if f.required or f.name in ALWAYS_SET}
    return cls(**keep)


def expected(name: str) -> tuple[Event, Event]:
    """The instances the two golden files of `name` decode to."""
    from tests.contract.golden.samples import SAMPLES

    sample = SAMPLES[name]
    return sample, minimal(sample)


def generation_hint(name: str) -> str:
    """What to do when `name` has no golden yet."""
    return (f"add a fully populated instance of {name} to SAMPLES in tests/contract/golden/samples.py, "
            f"then run `python -m tests.contract.golden {name}` and commit both files")


def write(name: str, *, force: bool = False) -> list[Path]:
    """Write both golden files of `name`; refuse to replace an existing one unless `force`."""
    from tests.contract.golden.samples import SAMPLES

    known = {t.__name__ for t in EVENT_TYPES}
    if name not in known:
        raise SystemExit(f"{name} is not in lockgate.contracts.EVENT_TYPES ({', '.join(sorted(known))})")
    if name not in SAMPLES:
        raise SystemExit(f"no sample for {name}: {generation_hint(name)}")
    files = paths(name)
    existing = [p for p in files if p.exists()]
    if existing and not force:
        raise SystemExit(f"{', '.join(p.name for p in existing)} exist: a golden is the v1 contract of {name} and is "
                         "not regenerated; evolve the type by appending fields with defaults (the test accepts "
                         "them), or pass --force if the old payloads truly no longer matter")
    for path, instance in zip(files, expected(name), strict=True):
        path.write_bytes(encode(instance))
    return list(files)
