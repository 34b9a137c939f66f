"""Golden v1 payloads: today's decoder reads each checked-in payload as the expected instance, and
today's encoder writes that instance back byte for byte, so changing a field's type, name or default
fails here. Fields appended with defaults (the documented way to evolve) are accepted."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from lockgate.codec import Codec, any_event, encode
from lockgate.contracts import EVENT_TYPES, SCHEMA_VERSION
from lockgate.errors import InvalidEvent
from tests.contract.golden import GOLDEN_DIR, expected, generation_hint, paths
from tests.contract.golden.samples import SAMPLES

TYPES = {t.__name__: t for t in EVENT_TYPES}
CASES = [pytest.param(name, which, id=f"{name}-{which}") for name in TYPES for which in ("full", "defaults")]

Fields = dict[str, msgspec.Raw]


def _golden(name: str, which: str) -> tuple[Path, bytes]:
    path = paths(name)[0 if which == "full" else 1]
    if not path.exists():
        pytest.fail(f"event type {name} has no golden payload {path.relative_to(GOLDEN_DIR.parents[2])}: "
                    f"{generation_hint(name)}", pytrace=False)
    return path, path.read_bytes()


def _instance(name: str, which: str) -> msgspec.Struct:
    if name not in SAMPLES:
        pytest.fail(f"event type {name} has no golden sample: {generation_hint(name)}", pytrace=False)
    return expected(name)[0 if which == "full" else 1]


def _fields(data: bytes) -> Fields:
    return msgspec.json.decode(data, type=Fields)


def _drop_appended(cls: type, encoded: bytes, golden: bytes) -> bytes:
    """`encoded` without the top-level fields that are absent from the golden and have defaults, i.e.
    fields appended since v1; the rest is re-joined from the encoder's own bytes, unchanged."""
    in_golden = set(_fields(golden))
    defaulted = {f.encode_name for f in msgspec.structs.fields(cls) if not f.required}
    kept = [(k, v) for k, v in _fields(encoded).items() if k in in_golden or k not in defaulted]
    return b"{" + b",".join(encode(k) + b":" + bytes(memoryview(v)) for k, v in kept) + b"}"


def _decode(decoder: Codec, path: Path, golden: bytes) -> msgspec.Struct:
    try:
        return decoder.decode(golden)
    except InvalidEvent as exc:
        pytest.fail(f"today's decoder cannot read the v1 payload {path.name}: {exc.message}; a field's type or "
                    "name changed, or a required field was added (append fields with defaults)", pytrace=False)


def _explain(golden: bytes, encoded: bytes) -> str:
    """Field by field: what v1 wrote and what today's encoder writes."""
    old, new = _fields(golden), _fields(encoded)
    lines = []
    for key in dict.fromkeys([*old, *new]):
        before = bytes(memoryview(old[key])).decode() if key in old else "(absent)"
        after = bytes(memoryview(new[key])).decode() if key in new else "(absent)"
        if before != after:
            lines.append(f"  $.{key}: v1 {before} -> now {after}")
    return "\n".join(lines) or "  (same fields and values; the byte layout differs)"


@pytest.mark.parametrize(("name", "which"), CASES)
def test_todays_decoder_reads_the_golden_payload_as_the_expected_instance(name: str, which: str) -> None:
    path, golden = _golden(name, which)
    want = _instance(name, which)
    for decoder in (Codec(TYPES[name]), any_event):
        got = _decode(decoder, path, golden)
        assert got == want, (f"{path.name} no longer decodes to the v1 instance: a field's type, name or default "
                             f"changed.\n  decoded:  {got!r}\n  expected: {want!r}")


@pytest.mark.parametrize(("name", "which"), CASES)
def test_todays_encoder_writes_the_golden_bytes(name: str, which: str) -> None:
    path, golden = _golden(name, which)
    # The decoded instance is encoded too: a sample is not validated at construction, so an int left in
    # a field that became a float would still compare equal (4 == 4.0) and encode as before.
    for source, instance in (("the expected instance", _instance(name, which)),
                             ("the decoded golden", _decode(Codec(TYPES[name]), path, golden))):
        encoded = _drop_appended(TYPES[name], encode(instance), golden)
        assert encoded == golden, (
            f"the v1 encoding of {name} changed ({path.name}, encoding {source}); payloads already on the wire "
            f"and in JetStream must keep their meaning: append a new field with a default instead.\n"
            f"{_explain(golden, encoded)}")


def test_every_golden_payload_belongs_to_a_known_event_type() -> None:
    names = {p.name.split(".")[0] for p in GOLDEN_DIR.glob("*.json")}
    gone = sorted(names - set(TYPES))
    assert not gone, f"event types removed from EVENT_TYPES while v1 payloads of them exist: {gone}"


@pytest.mark.parametrize("name", list(TYPES))
def test_golden_sample_sets_every_v1_field_to_a_non_default_value(name: str) -> None:
    # A field left at its default would let a change of that default, or of its type, pass unseen.
    _, golden = _golden(name, "full")
    sample = _instance(name, "full")
    v1_fields = set(_fields(golden))
    defaulted = [f for f in msgspec.structs.fields(TYPES[name])
                 if f.encode_name in v1_fields and not f.required and f.name != "schema_version"]
    at_default = [f.name for f in defaulted if getattr(sample, f.name) == f.default]
    assert not at_default, f"the golden sample of {name} leaves {at_default} at their defaults"
    assert sample.schema_version == SCHEMA_VERSION == 1


def test_generator_writes_a_new_golden_and_never_replaces_one_without_force(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.contract.golden as golden

    checked_in = paths("CostRecord")[0].read_bytes()
    monkeypatch.setattr(golden, "GOLDEN_DIR", tmp_path)
    golden.write("CostRecord")
    assert (tmp_path / "CostRecord.json").read_bytes() == checked_in
    (tmp_path / "CostRecord.json").write_bytes(b"kept")
    with pytest.raises(SystemExit, match="--force"):
        golden.write("CostRecord")
    assert (tmp_path / "CostRecord.json").read_bytes() == b"kept"
    golden.write("CostRecord", force=True)
    assert (tmp_path / "CostRecord.json").read_bytes() == checked_in
    with pytest.raises(SystemExit, match="not in lockgate.contracts.EVENT_TYPES"):
        golden.write("NoSuchEvent")
