"""The readers of `lockgate.onereading` (probe p20 F2, F3, F7): a key given twice, at any depth, is refused naming it
and its path (in JSON and YAML), and so is a plain YAML scalar YAML 1.1 (lockgate's reader) and YAML 1.2 read as
different values; what every reader reads alike reads as before. Through the CLI: test_signed_files_read_one_way.py and
tests/integration/test_gitops_one_reading.py."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from lockgate import documents
from lockgate.contracts import GateDecided
from lockgate.errors import ConfigError, SignatureError
from lockgate.onereading import TwoReadings, json_loads, yaml_loads

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(("text", "said"), [
    ('{"a": 1, "a": 2}', 'key "a" is given twice (readers differ on which one counts) - at `$.a`'),
    ('{"x": [{"b": {"c": 1, "c": 1}}]}', 'key "c" is given twice (readers differ on which one counts) - at `$.x[0].b.c`'),
    ('{"decision": "PASS", "decis\\u0069on": "BLOCK"}', 'key "decision" is given twice'),  # escapes are one key
    ('[1, {"a b": {"q\\n": 1, "q\\n": 2}}]', '- at `$[1]["a b"]["q\\n"]`'),  # odd names stay on one line
])
def test_a_json_key_given_twice_is_refused_naming_it_and_its_path(text: str, said: str) -> None:
    with pytest.raises(TwoReadings) as caught:
        json_loads(text)
    assert said in str(caught.value) and "\n" not in str(caught.value)


def test_json_without_a_repeated_key_reads_as_json_loads_reads_it() -> None:
    text = '{"a": [1, 2.5, {"b": null, "c": "d"}], "e": {"a": 1}, "f": 12345678901234567890123}'
    assert json_loads(text) == json.loads(text)
    with pytest.raises(ValueError):  # not JSON: json's own error, for the caller to word
        json_loads("{")


@pytest.mark.parametrize(("text", "said"), [
    ("spec:\n  rules:\n    - {name: a, threshold: 0.8, threshold: 0.0}\n",
     'key "threshold" is given twice, on lines 3 and 3 (readers differ on which one counts) - at '
     "`$.spec.rules[0].threshold`"),
    ("a: 1\nb:\n  c: 2\na: 3\n", 'key "a" is given twice, on lines 1 and 4'),
    ("x: [1, {k: v, 'k': w}]\n", 'key "k" is given twice, on lines 1 and 1 (readers differ on which one counts) - at '
     "`$.x[1].k`"),
    ("a: 1\n1: 2\n1.0: 3\n", 'key "1.0" is "1" again, on lines 2 and 3'),  # one dict key to every YAML reader
    ("interval_s: 0300\n", "0300 (line 1) is the number 192 to a YAML 1.1 reader (lockgate's) and the number 300 to a "
     "YAML 1.2 one: quote it if it is text, or write the number you mean without leading zeros, `_` or `:` - at "
     "`$.interval_s`"),
    ("steps:\n  - 1:30\n", "1:30 (line 2) is the number 90 to a YAML 1.1 reader (lockgate's) and text to a YAML 1.2 "
     "one"),
    ("a: 1_000\n", "1_000 (line 1) is the number 1000"),
    ("a: 0b101\n", "0b101 (line 1) is the number 5"),
    ("a: -0x1F\n", "-0x1F (line 1) is the number -31"),
    ("use_interval: on\n", "on (line 1) is the boolean true to a YAML 1.1 reader (lockgate's) and text to a YAML 1.2 "
     "one: quote it if it is text, or write true or false - at `$.use_interval`"),
    ("country: no\n", "no (line 1) is the boolean false"),
    ("yes: 1\n", "- at `$.yes`"),  # a key is a scalar as any other
    ("a: 1e3\n", "1e3 (line 1) is text to a YAML 1.1 reader (lockgate's) and the number 1000.0 to a YAML 1.2 one: "
     "quote it if it is text, or write 1000.0 (the number YAML 1.2 reads)"),
    ("a: 08\n", "08 (line 1) is text to a YAML 1.1 reader (lockgate's) and the number 8"),
    ("a: 0o17\n", "write 15 (the number YAML 1.2 reads)"),
])
def test_a_yaml_document_read_two_ways_is_refused_naming_line_and_path(text: str, said: str) -> None:
    with pytest.raises(TwoReadings) as caught:
        yaml_loads(text)
    assert said in str(caught.value), str(caught.value)


def test_yaml_both_versions_read_alike_reads_as_safe_load_reads_it() -> None:
    import yaml

    text = ("a: 0\nb: 00\nc: 0x1F\nd: +12\ne: 1.5\nf: .5\ng: 1.0e+3\nh: .inf\ni: -.inf\nj: true\nk: False\nl: null\n"
            "m: ~\nn:\no: '0300'\np: \"on\"\nq: 1.2.3\nr: 10.0.0.1\ns: abc-1\nt: 2024-01-01\nu: [1, {v: w}]\n"
            "base: &b {x: 1, y: 2}\nmerged:\n  <<: *b\n  x: 5\n")
    assert yaml_loads(text) == yaml.safe_load(text)
    assert yaml_loads(text)["merged"] == {"x": 5, "y": 2}  # a key a merge brings may be given again: that is a merge
    with pytest.raises(yaml.YAMLError):
        yaml_loads("a: [")


def test_every_reader_of_documents_refuses_a_document_read_two_ways(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("name: p\nname: q\n")
    with pytest.raises(ConfigError) as caught:
        documents.load_yaml(tmp_path / "p.yaml", dict, name="policy")
    assert caught.value.message == (f'policy {tmp_path / "p.yaml"} is refused: key "name" is given twice, on lines 1 '
                                    "and 2 (readers differ on which one counts) - at `$.name`")
    for data, fmt in (('{"a": 1, "a": 1}', "json"), ("a: 1\na: 1\n", "yaml"), ("a: on\n", "yaml")):
        with pytest.raises(ConfigError, match=r"^f.yaml is refused: .* - at `\$.a`$"):
            documents.parse(data, fmt, where="f.yaml")  # type: ignore[arg-type]
    with pytest.raises(SignatureError, match=r'^d.json is refused: key "x" is given twice'):
        documents.decode_json(b'{"x": 1, "x": 2}', dict, where="d.json", error=SignatureError)
    # What load_yaml read before, it reads the same (msgspec.yaml.decode's conversions, dates among them).
    (tmp_path / "ok.yaml").write_text("a: 2024-01-02\nb: [1, 2.5]\n")
    assert documents.load_yaml(tmp_path / "ok.yaml", dict, name="x") == msgspec.yaml.decode(
        (tmp_path / "ok.yaml").read_bytes())
    with pytest.raises(msgspec.ValidationError):  # not a `type_`: msgspec's error, for the caller to word
        documents.decode_json(b'{"release": 1}', GateDecided, where="d.json")


@pytest.mark.parametrize(("raw", "media"), [(b'{"a": 1, "a": 2}', "application/json"),
                                            (b'{"a": 1}\n{"b": {"c": 1, "c": 2}}\n', "application/jsonl"),
                                            (b"a: 1\na: 2\n", "application/yaml")])
def test_an_artifact_with_a_key_given_twice_is_refused_at_registration(raw: bytes, media: str) -> None:
    # Its canonical form (what is stored and hashed) would hold the last value; the file in Git shows both.
    from lockgate.artifacts import canonical_bytes

    with pytest.raises(ConfigError, match="is refused: key .* is given twice"):
        canonical_bytes(raw, media)


@pytest.mark.parametrize(("raw", "media", "said"), [
    (b'{"rules": [{"slices": {"max_regression": 1.0e+999}}]}', "application/json",
     "artifact (application/json): inf is no number JSON can carry (only finite ones) - at "
     "`$.rules[0].slices.max_regression`"),
    (b'{"a": -Infinity}', "application/json", "-inf is no number JSON can carry"),
    (b"a: [1, .nan]\n", "application/yaml",
     "artifact (application/yaml): nan is no number JSON can carry (only finite ones) - at `$.a[1]`"),
    (b'{"a": 1}\n{"b": 1e999}\n', "application/jsonl",
     "artifact is not valid application/jsonl: line 2: inf is no number JSON can carry (only finite ones) - at `$.b`"),
    ({"a": {"b": float("inf")}}, "application/json", "artifact: inf is no number JSON can carry"),
])
def test_an_artifact_with_a_number_json_cannot_carry_is_refused_at_registration(
        raw: bytes | dict, media: str, said: str) -> None:
    # Before (probe p68 F1): canonical JSON wrote it `null`, so what was stored and hashed said other than the file.
    from lockgate.artifacts import canonical_bytes

    with pytest.raises(ConfigError) as err:
        canonical_bytes(raw, media)
    assert said in err.value.message
