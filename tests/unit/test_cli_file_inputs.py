"""Every file the CLI loads goes through one guarded reader (`documents.parse`): nesting too deep for Python,
text that is not UTF-8 and YAML alias bombs end in one line naming the file, never a traceback (probe p11)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from lockgate import credentials, documents
from lockgate.artifacts import canonical_bytes
from lockgate.cli.main import cli
from lockgate.errors import ConfigError
from lockgate.pricebook import PriceBookError, load_price_book

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "gitops"
DEEP = "[" * 200_000 + "]" * 200_000
BIG = "1" * 5_000  # past the 4,300 digits Python's int() reads


def _bomb(levels: int) -> str:
    text, prev = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n', "a"
    for i in range(1, levels):
        name = chr(ord("a") + i)
        text += f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
        prev = name
    return text


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    (d / "deep.json").write_text(DEEP)
    (d / "deep.jsonl").write_text('{"a":' + DEEP + "}\n")
    (d / "deep.yaml").write_text(f"a: {DEEP}\n")
    (d / "latin1.yaml").write_bytes("weight: 10 # caf\xe9\n".encode("latin-1"))
    (d / "bomb.yaml").write_text(_bomb(10))
    (d / "bigint.yaml").write_text(f"weight: 10\nsteps: [{BIG}]\n")
    (d / "surrogate.yaml").write_text('weight: 10\nreason: "\\ud800"\n')
    return d


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    credentials.ensure(h)
    return h


def invoke(home: Path, *args: str) -> Result:
    env = {"LOCKGATE_NATS_URL": "nats://127.0.0.1:1", "LOCKGATE_HOME": str(home), "LOCKGATE_ROLE": None,
           "LOCKGATE_CLICKHOUSE_URL": None, "LOCKGATE_NATS_USER": None, "LOCKGATE_NATS_PASSWORD": None,
           "LOCKGATE_API_KEY": None}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def one_line(result: Result, code: int, said: str) -> None:
    assert result.exit_code == code, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and said in result.stderr
    if result.stdout:
        assert json.loads(result.stdout)["exit_code"] == code


@pytest.mark.parametrize(("args", "code", "said"), [
    (("rollout", "--api-key", "k", "patch", "shop-web", "-f", "{in}/latin1.yaml", "--json"), 2, "latin1.yaml"),
    (("rollout", "--api-key", "k", "patch", "shop-web", "-f", "{in}/deep.json", "--json"), 2, "nested too deeply"),
    (("rollout", "--api-key", "k", "patch", "shop-web", "-f", "{in}/deep.yaml"), 2, "nested too deeply"),
    (("rollout", "--api-key", "k", "patch", "shop-web", "-f", "{in}/bomb.yaml", "--json"), 2,
     "its aliases expand it to more than 5,000,000 values"),
    (("budget", "list", "--file", "{in}/latin1.yaml", "--json"), 2, "latin1.yaml"),
    (("budget", "list", "--file", "{in}/deep.yaml"), 2, "nested too deeply"),
    (("attest", "verify", "{in}/deep.json", "--json"), 4, "nested too deeply"),
    (("verify", "{in}/deep.json"), 4, "nested too deeply"),
    # Before (probe p58 F6): a ValueError traceback; a lone surrogate (which PyYAML's own parser reads, libyaml does
    # not) a UnicodeEncodeError worded "not valid JSON".
    (("rollout", "--api-key", "k", "patch", "shop-web", "-f", "{in}/bigint.yaml", "--json"), 2,
     "a value Python cannot read (Exceeds the limit (4300 digits)"),
    (("rollout", "--api-key", "k", "patch", "shop-web", "-f", "{in}/surrogate.yaml"), 2, "a lone surrogate"),
])
def test_a_malformed_file_is_refused_in_one_line_naming_it(home: Path, inputs: Path, args: tuple[str, ...],
                                                            code: int, said: str) -> None:
    # Before (probe p11): a RecursionError or UnicodeDecodeError traceback, and nothing on stdout with --json;
    # `rollout patch -f` expanded the alias bomb (memory growing past 60 s).
    result = invoke(home, *(a.replace("{in}", str(inputs)) for a in args))
    one_line(result, code, said)
    assert str(inputs) in result.stderr


def test_plan_of_a_folder_with_a_too_deep_dataset_is_one_line(home: Path, inputs: Path, tmp_path: Path) -> None:
    folder = tmp_path / "gitops"
    shutil.copytree(FIXTURE, folder)
    shutil.copy(inputs / "deep.jsonl", folder / "datasets" / "qa.jsonl")
    one_line(invoke(home, "plan", str(folder), "--json"), 1, "nested too deeply")


@pytest.mark.parametrize(("document", "said"), [
    (f"kind: policy\nname: gitshop-gate\nspec: {{name: gitshop-gate, rules: [], no_data: {BIG}}}\n",
     "a value Python cannot read"),
    ("kind: policy\nname: gitshop-gate\nspec: {name: gitshop-gate, rules: [], no_data: 2024-02-30}\n",
     "a value Python cannot read (day is out of range for month)"),
])
def test_plan_of_a_folder_with_a_value_python_cannot_read_is_one_line(home: Path, tmp_path: Path, document: str,
                                                                      said: str) -> None:
    # Before (probe p58 F6): load_yaml let int()'s ValueError (and datetime's) out, a traceback.
    folder = tmp_path / "gitops"
    shutil.copytree(FIXTURE, folder)
    (folder / "policies" / "default.yaml").write_text(document)
    result = invoke(home, "plan", str(folder), "--json")
    one_line(result, 1, said)
    assert "policies/default.yaml" in result.stderr and "line 3" in result.stderr


@pytest.mark.parametrize(("name", "said"), [("bigint.yaml", "a value Python cannot read"),
                                            ("surrogate.yaml", "a lone surrogate")])
def test_a_price_book_python_cannot_read_is_one_price_book_error(inputs: Path, name: str, said: str) -> None:
    # Before (probe p58 F6): ValueError and UnicodeEncodeError escaped load_price_book (the router's and the
    # evaluator's start), and a YAML error's message spanned several lines.
    with pytest.raises(PriceBookError) as caught:
        load_price_book(str(inputs / name))
    assert caught.value.message.startswith(f"price book {inputs / name} is not valid YAML: {said}")
    assert "line 2" in caught.value.message and "\n" not in caught.value.message


def test_a_router_admin_key_that_is_not_utf8_is_one_line(home: Path) -> None:
    (home / "credentials" / "router-admin.key").write_bytes(b"k\xe9y\n")
    one_line(invoke(home, "rollout", "get", "shop-web", "--json"), 2, "router-admin.key: not UTF-8 text")


@pytest.mark.parametrize(("name", "media"), [("deep.json", "application/json"), ("deep.yaml", "application/yaml"),
                                             ("deep.jsonl", "application/jsonl"),
                                             ("latin1.yaml", "application/jsonl")])
def test_artifact_content_too_deep_or_not_utf8_is_a_config_error(inputs: Path, name: str, media: str) -> None:
    with pytest.raises(ConfigError):
        canonical_bytes((inputs / name).read_bytes(), media)


@pytest.mark.parametrize(("data", "fmt", "said"), [
    (DEEP, "json", "nested too deeply"), (f"a: {DEEP}", "yaml", "nested too deeply"),
    (b"\xff\n", "text", "not UTF-8 text (line 1)"), (b"ok\n\xe9", "json", "not UTF-8 text (line 2)"),
    ("{", "json", "not valid JSON"), ("a: [", "yaml", "not JSON or YAML"),
    (_bomb(10), "yaml", "is refused: its aliases expand it"),
    (f"a: {BIG}", "yaml", "not JSON or YAML (a value Python cannot read"),
    ('a: "\\udc00"', "yaml", "not JSON or YAML (a lone surrogate"),
    (f"[{BIG}]", "json", "not valid JSON: Exceeds the limit"),
])
def test_parse_turns_every_failure_into_one_config_error(data: str | bytes, fmt: str, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        documents.parse(data, fmt, where="f.yaml")  # type: ignore[arg-type]
    assert caught.value.message.startswith("f.yaml") and said in caught.value.message
    assert "\n" not in caught.value.message


def test_parse_reads_what_it_always_read() -> None:
    assert documents.parse('{"a": [1, 2]}', "json", where="x") == {"a": [1, 2]}
    assert documents.parse("a: &x [1]\nb: *x\n", "yaml", where="x") == {"a": [1], "b": [1]}
    assert documents.parse("caf\xe9".encode(), "text", where="x") == "caf\xe9"
