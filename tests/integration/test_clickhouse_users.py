"""deploy/clickhouse/users.d/lockgate.xml checked offline: a readonly operator profile with time and
memory bounds that agree with the settings the operator SQL session sends itself, a writer user for
the processes that open the store, read-only query users, passwords only from the environment, and
every GRANT and row policy parsed by ClickHouse's own parser (chDB's `formatQuery`).

What is not testable here: chDB does not load users.xml, so no test logs in as these users; that
needs a ClickHouse server (the testcontainers test in test_distributed.py, where Docker runs)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lockgate.errors import LockgateError
from lockgate.store.client import READONLY_SETTINGS, Store

ROOT = Path(__file__).resolve().parents[2]
USERS = ROOT / "deploy/clickhouse/users.d/lockgate.xml"
POLICIES = ROOT / "deploy/clickhouse/row_policies.sql"
WRITER, READER, READONLY_PROFILE = "lockgate", "lockgate_reader", "lockgate_readonly"
_WRITES = re.compile(r"\b(INSERT|ALTER|CREATE|DROP|TRUNCATE|ALL)\b")


def _parses(store: Store, sql: str) -> str:
    """'' when ClickHouse's parser accepts `sql`, else its message."""
    try:
        store.rows("SELECT formatQuery({q:String}) AS q", {"q": sql})
    except LockgateError as exc:
        return str(exc)
    return ""


def users_problems(text: str, store: Store) -> list[str]:
    """What is wrong with the users file (empty: nothing)."""
    root = ET.fromstring(text)
    problems = []
    profiles = {p.tag: {s.tag: (s.text or "").strip() for s in p} for p in root.find("profiles") or []}
    ro = profiles.get(READONLY_PROFILE, {})
    if ro.get("readonly") not in ("1", "2"):
        problems.append(f"profile {READONLY_PROFILE}: readonly must be 1 or 2, is {ro.get('readonly')!r}")
    problems += [f"profile {READONLY_PROFILE}: no {s}" for s in ("max_execution_time", "max_memory_usage",
                                                                  "max_result_rows") if not ro.get(s, "").isdigit()]
    # readonly=1 forbids changing a setting, and the session sends these: the values must agree, or every
    # operator query on a server is refused ("Cannot modify ... in readonly mode").
    for name, value in READONLY_SETTINGS.items():
        if name in ro and ro[name] != value:
            problems.append(f"profile {READONLY_PROFILE}: {name}={ro[name]} but the operator SQL session sends {value}")
    users = {u.tag: u for u in root.find("users") or []}
    for name, user in users.items():
        password = user.find("password")
        if password is None or not password.get("from_env") or (password.text or "").strip():
            problems.append(f"user {name}: the password must come from the environment (from_env)")
        profile = (user.findtext("profile") or "").strip()
        if profile not in profiles:
            problems.append(f"user {name}: unknown profile {profile!r}")
        grants = [(q.text or "").strip() for q in user.iter("query")]
        for grant in grants:
            if err := _parses(store, f"{grant} TO {name}"):
                problems.append(f"user {name}: {grant!r} does not parse: {err[:200]}")
        reader = name.startswith(READER)
        if reader and profile != READONLY_PROFILE:
            problems.append(f"user {name}: a query user must have the {READONLY_PROFILE} profile")
        if reader and any(_WRITES.search(g.split(" ON ")[0]) for g in grants):
            problems.append(f"user {name}: a query user may only SELECT")
    if WRITER not in users or not any("INSERT" in (q.text or "") for q in users[WRITER].iter("query")):
        problems.append(f"no writer user {WRITER!r} granted INSERT (the sink)")
    elif profiles.get((users[WRITER].findtext("profile") or "").strip(), {}).get("readonly", "0") != "0":
        problems.append(f"user {WRITER}: the writer's profile must not be readonly")
    if READER not in users:
        problems.append(f"no query user {READER!r} (operator SQL)")
    return problems


def test_users_file_has_the_operator_profile_and_the_users(store: Store) -> None:
    assert users_problems(USERS.read_text(), store) == []


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("<readonly>1</readonly>", "<readonly>0</readonly>", "readonly must be 1 or 2"),
    ("<max_memory_usage>2000000000</max_memory_usage>", "", "no max_memory_usage"),
    ("<max_execution_time>25</max_execution_time>", "<max_execution_time>30</max_execution_time>",
     "max_execution_time=30 but the operator SQL session sends 25"),
    ('<password from_env="LOCKGATE_CLICKHOUSE_READER_PASSWORD"/>', "<password>secret</password>",
     "user lockgate_reader: the password must come from the environment"),
    ("<query>GRANT SELECT ON lockgate.*</query>", "<query>GRANT SELECT, INSERT ON lockgate.*</query>",
     "user lockgate_reader: a query user may only SELECT"),
    ("<query>GRANT SELECT ON lockgate.*</query>", "<query>GRANT SELEKT ON lockgate.*</query>", "does not parse"),
    ("<profile>lockgate_writer</profile>", "<profile>lockgate_readonly</profile>", "must not be readonly"),
])
def test_a_broken_users_file_fails(store: Store, old: str, new: str, expected: str) -> None:
    text = USERS.read_text()
    assert old in text
    problems = users_problems(text.replace(old, new, 1), store)
    assert any(expected in p for p in problems), problems


def test_row_policies_parse_and_name_users_that_exist(store: Store) -> None:
    users = {u.tag for u in ET.fromstring(USERS.read_text()).find("users") or []}
    sql = "\n".join(ln for ln in POLICIES.read_text().splitlines() if not ln.lstrip().startswith("--"))
    statements = [s.strip() for s in sql.split(";") if s.strip()]
    assert statements
    for stmt in statements:
        assert _parses(store, stmt) == ""
        assert set(re.findall(r"\bTO\s+(\w+)", stmt)) <= users, stmt


def test_a_tenant_reader_is_granted_only_tables_its_row_policies_restrict_and_all_of_them(store: Store) -> None:
    # Before: the tenant reader was granted lockgate.* and its policy covered 4 tables, so it read every tenant's
    # cost rollup, scores, analysis runs, audit log, drift reports and spans.
    with_tenant = {r["table"] for r in store.rows(
        "SELECT c.table AS table FROM system.columns AS c JOIN system.tables AS t ON c.database = t.database "
        "AND c.table = t.name WHERE c.database = {db:String} AND c.name = 'tenant' AND t.engine NOT LIKE '%View'",
        {"db": store.database})}
    assert {"inference_events", "cost_hourly", "drift_reports", "audit_log"} <= with_tenant
    sql = "\n".join(ln for ln in POLICIES.read_text().splitlines() if not ln.lstrip().startswith("--"))
    policies = {m[0]: ({t.strip().removeprefix("lockgate.") for t in m[1].split(",")}, m[2], m[3]) for m in
                re.findall(r"CREATE ROW POLICY IF NOT EXISTS (\w+) ON (.+?)\s+USING (.+?) TO (\w+);", sql, re.S)}
    assert policies["tenant_acme"][:2] == (with_tenant, "tenant = 'acme'")
    assert policies["tenant_acme_spans"][0] == {"otel_traces"}
    assert policies["reader_all"][0] == with_tenant | {"otel_traces"}
    users = {u.tag: u for u in ET.fromstring(USERS.read_text()).find("users") or []}
    granted = {(q.text or "").strip().removeprefix("GRANT SELECT ON lockgate.") for q in
               users["lockgate_reader_acme"].iter("query")}
    assert granted == with_tenant | {"otel_traces"}
