"""`lockgate rollout start|get|watch|pause|resume|approve|abort|retry|promote|undo|set-weight|patch|history|analysis`:
roll a release out and operate a deployment's rollout.

`start` of a canary sends the `rollout:` of the deployment's applied GitOps document (read from the applied state
over NATS) as its strategy, with --strategy, --steps and --interval-s over it, and says which steps and interval run.
Actions go to the router's admin API with an API key (operator or admin role for changes, any
role for `get` and `watch`); the router records the key's identity as the actor. A `--role` that may not change
rollouts (viewer, approver) is refused before a change is sent, whatever role the API key has. `history` and
`analysis` read the stored rollout events and signed analysis records through the query service,
like every other query command; `analysis` checks each record's signature. Where nothing is stored, they ask the
router whether it serves the deployment, and exit 3 as `get` does if nothing does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import click
from rich.text import Text

from lockgate import documents
from lockgate.cli import access, running
from lockgate.cli.params import PERCENT, TIME, WEEK_S, FiniteFloat
from lockgate.cli.render import console, emit_json, err_console, output, shown, table
from lockgate.cli.root import handle_errors, json_option
from lockgate.contracts.names import check_name
from lockgate.credentials import NotAllowed
from lockgate.errors import ConfigError, LockgateError, NotFound, SignatureError
from lockgate.redact import shown_url
from lockgate.server.apikeys import ROUTE_CHANGERS, read_credential

_ADMIN = "/lockgate/v1/deployments"


class RouterUnavailable(LockgateError):
    """The router's admin API did not answer (wrong --router URL, or the stack is not running)."""


class RolloutRefused(LockgateError):
    """The router refused the action (its message says why: no canary, not admitted, wrong role ...)."""

    exit_code = 4


class RouterAdmin:
    """A small client of the router admin API (stdlib HTTP: the CLI stays synchronous)."""

    def __init__(self, url: str, key: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request; the decoded JSON answer, or RolloutRefused with the router's message."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{_ADMIN}{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.key}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise _refused(exc) from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: Exception) -> RouterUnavailable:
        # URLError and timeouts are OSErrors; an HTTPException (BadStatusLine, RemoteDisconnected) or a body that
        # is not JSON means something other than the router answers at the URL (a NATS port, another web server).
        if isinstance(exc, http.client.HTTPException | ValueError):
            what = f"something other than the router admin API answers at {shown_url(self.url)} (not HTTP JSON)"
        else:
            what = (f"cannot reach the router admin API at {shown_url(self.url)} "
                    f"({getattr(exc, 'reason', None) or str(exc) or exc.__class__.__name__})")
        return RouterUnavailable(f"{what}; pass --router URL (as `lockgate up` printed it) or set LOCKGATE_ROUTER_URL")

    def stream(self, path: str, idle_s: float) -> Any:
        """Lines of a streamed answer, decoded (None for a keepalive line); stops when the router closes it.
        A socket quiet for `idle_s` raises TimeoutError."""
        req = urllib.request.Request(f"{self.url}{_ADMIN}{path}", headers={"Authorization": f"Bearer {self.key}"})
        try:
            resp = urllib.request.urlopen(req, timeout=idle_s)
        except urllib.error.HTTPError as exc:
            raise _refused(exc) from None
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as exc:
            raise self._unavailable(exc) from None
        with resp:
            try:
                for line in resp:
                    yield json.loads(line) if line.strip() else None
            except (http.client.HTTPException, ValueError) as exc:
                raise self._unavailable(exc) from None


class WatchTimedOut(LockgateError):
    """The rollout neither completed nor aborted within --timeout."""

    exit_code = 5


class RolloutAborted(LockgateError):
    """The watched rollout was aborted (or rolled back)."""

    exit_code = 6


def _at(deployment: str, action: str = "") -> str:
    """The admin API path of a deployment's `action`: the name checked here (a bad one is a one-line error, not a
    malformed URL) and escaped, so that no character of it is taken for part of the path."""
    return f"/{urllib.parse.quote(check_name(deployment, 'deployment'), safe='')}{action}"


def _refused(exc: urllib.error.HTTPError) -> LockgateError:
    """The router's refusal as the CLI's error: NotFound (exit 3) for a deployment nothing serves, else
    RolloutRefused (exit 4) with the router's status and message."""
    body = exc.read()
    message = _message(body)
    if exc.code == 404 and _code(body) == "deployment_not_found":
        return NotFound(message)
    return RolloutRefused(f"router refused ({exc.code}): {message}")


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:500]


def _code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def _key(home: str, given: str | None) -> str:
    if given:
        return given
    path = Path(home) / "credentials" / "router-admin.key"
    try:
        return read_credential(path)
    except ConfigError:
        if path.exists():  # there but unreadable (not UTF-8, say): its own message says why
            raise
        raise ConfigError(f"no API key: pass --api-key (or LOCKGATE_API_KEY), or run where {path} exists "
                          "(`lockgate up --home DIR` writes it)") from None


def may_change() -> None:
    """NotAllowed (exit 5) if `--role` names a role that may not change rollouts, before anything is sent. The
    change goes with an API key (HOME/credentials/router-admin.key unless --api-key), not the NATS role, so before
    `--role viewer rollout abort` aborted as admin, where README says a role is refused what it may not do."""
    role = access.chosen_role("")
    if role and role not in ROUTE_CHANGERS:
        raise NotAllowed(f"role {role!r} may not run `{access.command()}`: use --role {' or '.join(ROUTE_CHANGERS)}")


def patch_body(weight: float | None, canary_release: str | None, file: str | None, inline: str | None) -> dict[str, Any]:
    """The merge patch `rollout patch` sends: the file's or --patch's object, then --weight and --canary-release
    on top; ConfigError (one line) if it is not a non-empty object."""
    # YAML is a superset of JSON: either reads here, through the guarded reader (aliases, nesting, encoding), as
    # every other file the CLI loads; before (probe p11), a 359-byte alias bomb took the operator's shell.
    values = []
    if file == "-":
        values.append((file, documents.parse(click.get_binary_stream("stdin").read(), "yaml", where="-")))
    elif file:
        values.append((file, documents.read(file, "yaml", name="merge patch")))
    if inline is not None:
        values.append(("--patch", documents.parse(inline, "yaml", where="--patch")))
    body: dict[str, Any] = {}
    for source, value in values:
        if not isinstance(value, dict):
            raise ConfigError(f'{source}: a merge patch is an object, e.g. {{"weight": 10}}')
        body.update(value)
    if weight is not None:
        body["weight"] = weight
    if canary_release is not None:
        body["canary_release"] = canary_release
    if not body:
        raise ConfigError("nothing to patch: give --weight, --canary-release, -f FILE or --patch JSON")
    return body


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%H:%M:%S UTC") if ts else "-"


def summary(route: dict[str, Any]) -> list[dict[str, Any]]:
    """`rollout get` as rows: where the canary stands, then the last analysis's metric values. A promoted rollout
    has no canary: the route keeps the promoted one's target (weight 0, the JSON's `canary`) until the next
    rollout, shown as `-` (it is the stable release now)."""
    canary = {} if route.get("phase") == "promoted" else route.get("canary") or {}
    strategy = route.get("strategy") or {}
    status = route.get("analysis") or {}
    phase = route.get("phase", "")
    if route.get("paused"):
        phase += " (paused)"
    rows = [{"field": k, "value": v} for k, v in (
        ("deployment", route.get("deployment")),
        ("phase", phase),
        ("stable", (route.get("stable") or {}).get("release") or "(default)"),
        ("canary", canary.get("release", "-")),
        ("weight", f"{route.get('weight', 0):g}%"),
        ("step", f"{route.get('step', 0)} of {', '.join(_step_text(s) for s in strategy.get('steps') or []) or _kind(strategy)}"),
        ("strategy", described(strategy)),
        # The number itself: `rollout approve --started-at` takes it to name the attempt whose pause it approves.
        ("started_at", f"{route['started_at']!r} ({_when(route['started_at'])})" if route.get("started_at") else "-"),
        ("header route", _header(route.get("header_route"))),
        # The decision the canary's admission rests on, and the key that signed it (`admitted`, `admitted_by` in
        # --json): before (probe p23 F7), a row "admitted by" showed the decision's id, the JSON's field the key's.
        ("admitted by decision", f"{route['admitted']} (signed by key {route.get('admitted_by') or '?'})"
         if route.get("admitted") else "-"),
        ("override", _override(route)),
        ("analysis", f"look {status.get('look', 0)}, failures {status.get('failures', 0)}, "
                     f"inconclusive {status.get('inconclusives', 0)}, at {_when(status.get('at', 0))}"
         if strategy.get("analysis") else "none (steps advance on time)"),
        ("reason", route.get("reason", "")),
    )]
    unreadable = route.get("unreadable")
    if unreadable:
        # The proxy refuses the deployment until its route is written again: what is shown is not served.
        revision = unreadable.get("last_readable_revision", 0)
        shown = (f"shown: its last readable revision ({revision}); `lockgate rollout start {route.get('deployment')} "
                 f"--stable {(route.get('stable') or {}).get('release')}` restores it" if revision else
                 "none of its KV history is readable: an admin key gives it a first release")
        rows.insert(1, {"field": "route record", "value": f"UNREADABLE ({unreadable.get('why', '')}), its requests "
                                                          f"refused (503 route_unreadable); {shown}"})
    if strategy.get("blue_green"):
        rows[-1:-1] = [{"field": k, "value": v} for k, v in (
            ("auto-promotion", _when(route.get("promote_at", 0))),
            ("post-promotion analysis", "running" if route.get("verifying") else "-"),
            ("instant rollback until", _when(route.get("scale_down_at", 0))),
        )]
    return rows


def _override(route: dict[str, Any]) -> str:
    """The break-glass overrides in effect: a canary's reason, and the promote's statement the stable serves by."""
    said = [str(route["override"].get("reason", "-"))] if route.get("override") else []
    if glass := route.get("glass_stable"):
        said.append(f"stable {glass.get('release')} serves by BREAK-GLASS promote of {glass.get('actor')}: "
                    f"{glass.get('reason')} (until a gate decision admits it or it is rolled back)")
    return "; ".join(said) or "-"


def _header(h: dict[str, Any] | None) -> str:
    """A header route as `x-lockgate-canary: always -> canary (admin keys and key k1)`: whose requests it sends."""
    if not h:
        return "-"
    keys = h.get("keys") or []
    testers = "admin keys" + (f" and key{'s' * (len(keys) > 1)} {', '.join(keys)}" if keys else "")
    return f"{h['header']}: {h['value']} -> canary ({testers})"


def _kind(strategy: dict[str, Any]) -> str:
    if strategy.get("blue_green"):
        return "blue-green"
    return "shadow only" if strategy.get("shadow") else "router steps"


def _step_text(step: Any) -> str:
    """A step as `25`, `pause 60s`, `pause (approval)` or `header x-lockgate-canary`."""
    if isinstance(step, int | float):
        return f"{step:g}"
    if step.get("set_weight") is not None:
        return f"{step['set_weight']:g}"
    if step.get("pause") is not None:
        d = step["pause"].get("duration_s")
        return f"pause {d:g}s" if d else "pause (approval)"
    return f"header {step['set_header_route']['header']}"


def described(strategy: dict[str, Any] | None) -> str:
    """What a route's strategy runs, in words (`steps 10, 50, 100 every 300 s`), naming the router's configured steps
    or interval where it holds none of its own."""
    s = strategy or {}
    interval = s.get("interval_s")
    if s.get("blue_green") is not None or (s.get("shadow") is not None and not s.get("steps")):
        kind = "blue-green" if s.get("blue_green") is not None else "shadow only"
        return f"{kind}, interval " + (f"{interval:g} s" if interval else "as the router is configured")
    steps = ", ".join(_step_text(step) for step in s.get("steps") or []) or "the router's configured steps"
    every = f"every {interval:g} s" if interval else "at the router's configured interval"
    return f"{'steps ' * bool(s.get('steps'))}{steps} {every}"


def strategy_of(kind: str, steps: Any, interval_s: float | None) -> dict[str, Any] | None:
    """The PUT's `strategy` for a deployment document's `rollout:` (its strategy, steps and interval_s): a canary's
    steps, or a blue-green or shadow-only rollout with the router's defaults for all a document cannot declare; None
    when nothing is chosen (the router's configured steps and interval run it)."""
    body: dict[str, Any] = {"blue_green": {}} if kind == "blue_green" else {"shadow": {}} if kind == "shadow" else {}
    if kind == "canary" and steps:
        body["steps"] = [float(w) for w in steps]
    if interval_s:
        body["interval_s"] = float(interval_s)
    return body or None


def _runs_as(strategy: dict[str, Any] | None) -> tuple[Any, ...]:
    """A strategy as the router runs it (steps sorted, distinct, ending at 100), to tell two apart."""
    from lockgate.services.router.domain import normalize_steps  # the router's own rule, as `plan` compares

    s = strategy or {}
    return ("blue_green" in s, "shadow" in s, normalize_steps(s["steps"]) if s.get("steps") else (),
            s.get("interval_s"))


def chosen(deployment: str, entry: Any, given: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The strategy `rollout start` sends for a canary of `deployment`, and a sentence saying where it comes from.

    `entry` is the deployment's applied state (None: no applied folder declares it); `given` the options the
    operator gave (strategy, steps, interval_s), each over the document's own. Git is the truth: before (probe p23
    F4), the document's `rollout:` was recorded and never sent, and its 10/50/100 at 300 s ran as the router's
    10/25/50/100 at 5 s."""
    rollout = dict((entry.spec.get("rollout") or {}) if entry is not None else {})
    mine = {**rollout, **given}
    kind = mine.get("strategy", "canary")
    if kind != "canary" and "steps" in given:
        raise ConfigError(f"--steps are a canary's: a {kind} rollout has none (give --strategy canary)")
    strategy = strategy_of(kind, mine.get("steps"), mine.get("interval_s"))
    options = ", ".join(f"--{k.replace('_', '-')}" for k in given)
    if entry is None:
        if strategy is None:
            return None, (f"{deployment}: no applied folder declares it, so the router's configured steps and interval "
                          "run the canary")
        return strategy, f"{deployment}: {described(strategy)}, by {options} (no applied folder declares it)"
    commit = f"commit {entry.commit[:10]}{' (dirty)' * entry.dirty}" if entry.commit else "no commit (not in Git)"
    where = f"the applied document {entry.source} at {commit}"
    declared = strategy_of(rollout.get("strategy", "canary"), rollout.get("steps"), rollout.get("interval_s"))
    if _runs_as(strategy) == _runs_as(declared):
        return strategy, f"{deployment}: {described(strategy)}, from {where}"
    return strategy, (f"{deployment}: {described(strategy)}, by {options} over {where}, which says "
                      f"{described(declared)}: the live route differs from the folder, and `lockgate plan` shows it")


def _weights(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    """`--steps 10,50,100` as weights in (0, 100]."""
    if value is None:
        return None
    try:
        steps = [float(w) for w in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not weights separated by commas, e.g. 10,50,100") from None
    if not all(0 < w <= 100 for w in steps):
        raise click.BadParameter(f"{value!r}: each step is a weight in percent, above 0 and at most 100")
    return steps


def metric_rows(route: dict[str, Any]) -> list[dict[str, Any]]:
    """The last measurement, one row per metric: canary and stable values against the threshold."""
    last = (route.get("analysis") or {}).get("last") or {}
    return [{"metric": m["name"] + (f" on {m['group']}" if m.get("group") else "") + (" (dry run)" if m.get("dry_run") else ""), "verdict": m["verdict"], "canary": m.get("canary"), "stable": m.get("stable"),
             "threshold": m.get("threshold"), "n (canary/stable)": f"{m.get('canary_n', 0)}/{m.get('stable_n', 0)}",
             "why": m.get("why", "")} for m in last.get("metrics", [])]


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}"


def watch_view(route: dict[str, Any]) -> dict[str, Any]:
    """What `rollout watch` shows of a route: step, weights, the last analysis against its thresholds, and the
    last decision and reason."""
    status = route.get("analysis") or {}
    last = status.get("last") or {}
    strategy = route.get("strategy") or {}
    steps = strategy.get("steps") or []
    return {
        "deployment": route.get("deployment"), "phase": route.get("phase"), "paused": bool(route.get("paused")),
        "step": route.get("step", 0), "steps": len(steps), "weight": route.get("weight", 0.0),
        "stable": (route.get("stable") or {}).get("release", ""), "canary": (route.get("canary") or {}).get("release", ""),
        "analysis": {"look": status.get("look", 0), "verdict": last.get("verdict", ""),
                     "failures": status.get("failures", 0), "inconclusives": status.get("inconclusives", 0),
                     "metrics": [{k: m.get(k) for k in ("name", "verdict", "canary", "stable", "threshold", "dry_run")}
                                 for m in last.get("metrics", [])]} if strategy.get("analysis") or status else None,
        "decision_id": route.get("decision_id", ""), "reason": route.get("reason", ""),
    }


def _not_done(deployment: str, last: dict[str, Any] | None, timeout_s: float) -> str:
    """Why `rollout watch` stopped waiting: a paused rollout waits for a person, not for time, and is said so with
    why it paused (before, probe p22 F4: "still progressing after 4 s" for a canary the analysis had paused)."""
    if last is None:
        return f"rollout of {deployment}: nothing read from the router in {timeout_s:g} s"
    if last["paused"]:
        return (f"rollout of {deployment} is paused, waiting for a person (`lockgate rollout resume {deployment}` or "
                f"`abort`), after {timeout_s:g} s: {last['reason']}")
    return f"rollout of {deployment} still {last['phase']} after {timeout_s:g} s"


def watch_line(v: dict[str, Any]) -> str:
    """One line per change: `14:02:11 progressing step 2/4 canary 25% | error_rate 0.004 <= 0.015 ... | reason`."""
    phase = v["phase"] + (" (paused)" if v["paused"] else "")
    of = f"/{v['steps']}" if v["steps"] else ""
    canary = "-" if v["phase"] == "promoted" else v["canary"] or "-"  # as `rollout get` shows it (`summary`)
    parts = [f"{dt.datetime.now(dt.UTC):%H:%M:%S}Z {phase} step {v['step']}{of} canary {canary} "
             f"{v['weight']:g}% (stable {v['stable'] or '-'})"]
    a = v["analysis"]
    if a and a["metrics"]:
        parts.append(f"look {a['look']} {a['verdict']}: " + ", ".join(
            f"{m['name']} {_num(m['canary'])} vs threshold {_num(m['threshold'])} {m['verdict']}"
            for m in a["metrics"]))
    if v["decision_id"]:
        parts.append(f"decision {v['decision_id']}")
    parts.append(v["reason"])
    return " | ".join(parts)


def rollout_options(f: Any) -> Any:
    """`--canary` and `--started-at`: the rollout an action is aimed at."""
    f = click.option("--started-at", "started_at", type=TIME, default=None, metavar="T",
                     help="Act only on the rollout attempt that started then (its `started_at`, as `rollout get` "
                          "showed it).")(f)
    return click.option("--canary", "canary", default=None, metavar="RELEASE",
                        help="Act only while the deployment canaries this release (default: the canary and attempt "
                             "the route shows now, read first); refused (exit 4) once it runs another.")(f)


def aimed(client: Any, deployment: str, canary: str | None, started_at: float | None) -> dict[str, Any]:
    """The rollout an operator's action names (`canary`, `started_at`): those given, else the route's now, read first.
    The router refuses the action (409 `rollout_changed`) once the deployment runs another: before (probe p67 F2),
    a promote meant for one canary promoted the one a concurrent start had just put in its place."""
    if canary is None and started_at is None:
        now = client.call("GET", _at(deployment))
        canary = (now.get("canary") or {}).get("release") or ""
        started_at = now.get("started_at") if canary else None
    return {k: v for k, v in (("canary", canary), ("started_at", started_at)) if v}


def finished(route: dict[str, Any]) -> bool:
    """True once a rollout completed (promoted, post-promotion analysis done; a first release at once) or
    aborted."""
    rolled_out = route.get("canary") is not None or bool((route.get("stable") or {}).get("release"))
    return rolled_out and (
        route.get("phase") == "aborted" or (route.get("phase") == "promoted" and not route.get("verifying")))


def attempt(route: dict[str, Any]) -> tuple[str, float | None]:
    """Which rollout a route shows: its canary and when that canary started, or a first release's stable."""
    canary = (route.get("canary") or {}).get("release")
    if canary:
        return canary, route.get("started_at")
    return (route.get("stable") or {}).get("release", ""), None


def verified_runs(settings: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored analysis records with their signature checked: `verified` and, if not, why (`signature_error`)."""
    from lockgate import analysisruns

    ring = analysisruns.keyring(settings)
    out = []
    for row in rows:
        try:
            run = analysisruns.from_row(row)
            analysisruns.verify(run, ring)
            out.append({**row, "metrics": [dict(m) for m in _metrics(row)], "verified": True, "signature_error": ""})
        except (SignatureError, ValueError) as exc:
            why = exc.message if isinstance(exc, SignatureError) else f"unreadable record: {exc}"
            out.append({**row, "metrics": [dict(m) for m in _metrics(row)], "verified": False,
                        "signature_error": why})
    return out


def _metrics(row: dict[str, Any]) -> list[dict[str, Any]]:
    m = row.get("metrics") or []
    return json.loads(m) if isinstance(m, str) else list(m)


def run_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per metric of each record: value against threshold, verdict, and whether the record verifies."""
    rows = []
    for r in runs:
        sig = "verified" if r["verified"] else "UNVERIFIED"  # the error line after the table says why
        when = str(r.get("time", ""))[11:23]
        for m in r["metrics"] or [{}]:
            rows.append({"time": when, "analysis": f"{r.get('template', '')} step {r.get('step', 0)}",
                         "look": r.get("look", 0), "phase": r.get("phase", ""), "outcome": r.get("outcome", ""),
                         "metric": m.get("name", "-") + (" (dry run)" if m.get("dry_run") else ""),
                         "canary": _num(m.get("canary")), "stable": _num(m.get("stable")),
                         "condition": m.get("condition", ""), "threshold": _num(m.get("threshold")),
                         "verdict": m.get("verdict", ""), "signature": sig,
                         # a drift metric's value counts these features (the record's JSON says by how much)
                         "drifted": ", ".join(r.get("drifted_features") or []) if m.get("name") == "drift" else ""})
    return rows


def shadow_rows(s: dict[str, Any]) -> list[dict[str, Any]]:
    """The served-versus-shadow comparison as rows (deltas are shadow minus served)."""
    def num(v: Any, fmt: str = ".3g") -> str:
        return "-" if v is None else format(v, fmt)

    skipped = ", ".join(f"{k} {v}" for k, v in sorted((s.get("skipped") or {}).items())) or "-"
    return [{"field": k, "value": v} for k, v in (
        ("candidate", s.get("candidate") or "-"),
        ("mirrored (this router)", f"{s.get('mirrored', 0)} ({s.get('in_flight', 0)} in flight); skipped: {skipped}"),
        ("shadow events / pairs", f"{s.get('shadow_events', 0)} / {s.get('pairs', 0)}"),
        ("exact match", num(s.get("exact_match_rate"), ".1%")),
        ("errors served / shadow", f"{num(s.get('served_error_rate'), '.1%')} / {num(s.get('shadow_error_rate'), '.1%')}"),
        ("mean length delta (chars)", num(s.get("mean_length_delta"))),
        ("mean output tokens delta", num(s.get("mean_output_tokens_delta"))),
        ("mean latency delta (ms)", num(s.get("mean_latency_delta_ms"))),
        ("shadow cost (USD)", num(s.get("shadow_cost_usd"), ".4g")),
    )]


def register(cli: click.Group) -> None:
    """Attach `rollout` to the top-level group."""

    @cli.group()
    @click.option("--router", "router_url", envvar="LOCKGATE_ROUTER_URL",
                  help="Base URL of the router (default: the one the stack running from the home serves, else "
                       "http://127.0.0.1:ROUTER_PORT from settings).")
    @click.option("--api-key", envvar="LOCKGATE_API_KEY",
                  help="An operator or admin API key (default: HOME/credentials/router-admin.key).")
    @click.pass_context
    def rollout(ctx: click.Context, router_url: str | None, api_key: str | None) -> None:
        """Roll a release out and operate a deployment's canary: see it, pause, resume, abort, set its weight,
        read its history."""
        settings = ctx.obj["settings"]
        ctx.obj["router_url"] = (router_url or running.endpoints(settings.home).get("router", "").removesuffix("/v1")
                                 or f"http://127.0.0.1:{settings.router_port}")
        ctx.obj["api_key"] = api_key

    def admin(ctx: click.Context) -> RouterAdmin:
        return RouterAdmin(ctx.obj["router_url"], _key(ctx.obj["settings"].home, ctx.obj["api_key"]))

    def served(ctx: click.Context, deployment: str) -> None:
        """NotFound (exit 3), in the router's words, when nothing serves `deployment`: a stored read (history,
        analysis) that found nothing asks the router, as `get` does. Before, a name nobody rolled out to read as an
        empty history, exit 0. The router away or refusing the key: a note on stderr, and the empty answer stands
        (the store is read without the router)."""
        at = _at(deployment)  # a bad name is its own one-line error, not a note
        try:
            admin(ctx).call("GET", at)
        except NotFound:
            raise
        except LockgateError as exc:
            err_console.print(f"nothing stored of {deployment}, and the router could not be asked whether it serves "
                              f"it: {exc.message}", highlight=False, soft_wrap=True)

    def show(route: dict[str, Any], as_json: bool) -> None:
        if as_json:
            emit_json(route)
            return
        table(summary(route), title=f"rollout {route.get('deployment')}", columns=["field", "value"])
        metrics = metric_rows(route)
        if metrics:
            table(metrics, title="last analysis")
        if (route.get("strategy") or {}).get("shadow"):
            table(shadow_rows(admin(click.get_current_context()).call("GET", _at(route.get("deployment", ""), "/shadow"))),
                  title="shadow (candidate vs served)", columns=["field", "value"])

    @rollout.command("get")
    @click.argument("deployment")
    @json_option
    @click.pass_context
    @handle_errors
    def get(ctx: click.Context, deployment: str, as_json: bool) -> None:
        """Phase, weights, step, admission, the last analysis against its thresholds and the latest signed
        analysis record."""
        route = admin(ctx).call("GET", _at(deployment))
        show(route, as_json)
        if as_json or not (route.get("strategy") or {}):
            return
        try:
            rows = access.query(ctx.obj["settings"], "analysis_runs", direct=ctx.obj["direct"], deployment=deployment,
                                limit=1)
        except LockgateError as exc:  # the route is shown; the store may be away
            console.print(f"latest analysis record: unavailable ({exc.message})", highlight=False, soft_wrap=True)
            return
        if rows:
            table(run_rows(verified_runs(ctx.obj["settings"], rows)), title="latest analysis record")

    @rollout.command("start")
    @click.argument("deployment")
    @click.option("--stable", "stable", required=True, metavar="RELEASE",
                  help="The stable release: alone, the deployment's first release (it serves 100% at once).")
    @click.option("--canary", "canary", default=None, metavar="RELEASE",
                  help="A new release to roll out as a canary from --stable (it waits at 0% for a decision).")
    @click.option("--initial-weight", type=PERCENT, default=None,
                  help="The canary's first weight (percent) once a decision allows it; default the first step.")
    @click.option("--strategy", "kind", type=click.Choice(["canary", "blue_green", "shadow"]), default=None,
                  help="The rollout's kind, over the applied deployment document's `rollout.strategy`.")
    @click.option("--steps", callback=_weights, default=None, metavar="W,W,...",
                  help="A canary's weights in percent (10,50,100), over the applied document's `rollout.steps`.")
    @click.option("--interval-s", "interval_s", type=FiniteFloat(min=0, min_open=True), default=None,
                  metavar="SECONDS", help="Seconds between steps, over the applied document's `rollout.interval_s`.")
    @json_option
    @click.pass_context
    @handle_errors
    def start(ctx: click.Context, deployment: str, stable: str, canary: str | None, initial_weight: float | None,
              kind: str | None, steps: list[float] | None, interval_s: float | None, as_json: bool) -> None:
        """Roll a release out (PUT .../DEPLOYMENT). With --stable alone: a deployment's first release serves all
        traffic at once, only if its verified gate decision allows it. With --canary: a canary of that release
        from --stable (the serving release), gated step by step by the `rollout:` of the deployment's applied
        document (`lockgate apply`), with --strategy, --steps and --interval-s over it; the router's configured
        steps and interval when no applied folder declares the deployment and no option is given."""
        may_change()
        at = _at(deployment)  # a bad name is refused before anything is read or sent
        given = {k: v for k, v in (("strategy", kind), ("steps", steps), ("interval_s", interval_s)) if v is not None}
        body: dict[str, Any] = {"stable_release": stable}
        if canary is not None:
            body["canary_release"] = canary
        for option, value in (("--initial-weight", initial_weight), *((f"--{k.replace('_', '-')}", v)
                                                                     for k, v in given.items())):
            if value is not None and canary is None:
                raise ConfigError(f"{option} is a canary's: give --canary too (a first release serves 100%)")
        if initial_weight is not None:
            body["initial_weight"] = initial_weight
        said = ""
        if canary is not None:
            from lockgate.gitops.state import read_entry

            # Read before the PUT: the rollout starts with the strategy it is said to have. Unread, it does not start:
            # a canary on the router's steps where a folder declares others is the hole this read closes.
            try:
                entry = access.with_bus(ctx.obj["settings"], lambda bus: read_entry(bus, "deployment", deployment))
            except LockgateError as exc:
                exc.message = (f"nothing started: cannot read whether an applied folder declares the rollout of "
                               f"{deployment} (rollout start reads the applied state over NATS): {exc.message}")
                raise
            strategy, said = chosen(deployment, entry, given)
            if strategy is not None:
                body["strategy"] = strategy
        route = admin(ctx).call("PUT", at, body)
        # The router takes a canary the gate refuses and aborts it at once (200, phase aborted): a pipeline's
        # `rollout start` must not read that as "canary started" (probe p20 F4).
        if canary is not None and route.get("phase") == "aborted" and attempt(route)[0] == canary:
            raise RolloutAborted(f"rollout of {canary} on {deployment} aborted at once: {route.get('reason', '')}")
        if said:  # on stderr with --json, so that stdout stays the route's JSON alone
            (err_console if as_json else console).print(said, highlight=False, soft_wrap=True)
        show(route, as_json)

    def action(name: str, doc: str, *, reason: bool = False, bound: bool = True) -> None:
        @click.argument("deployment")
        @json_option
        @click.pass_context
        @handle_errors
        def run(ctx: click.Context, deployment: str, as_json: bool, **kw: Any) -> None:
            may_change()
            client = admin(ctx)
            body = {"reason": kw["reason"]} if kw.get("reason") else {}
            if bound:
                body |= aimed(client, deployment, kw["canary"], kw["started_at"])
            route = client.call("POST", _at(deployment, f"/{name}"), body or None)
            if as_json:
                emit_json(route)
            else:
                console.print(route.get("reason", ""), highlight=False, soft_wrap=True)

        run.__doc__ = doc
        if bound:
            run = rollout_options(run)
        if reason:
            run = click.option("--reason", default="", help="Why (recorded with your identity).")(run)
        if name == "promote":
            # `kubectl argo rollouts promote --full`'s form, which issue 8 names: accepted, and what promote always
            # does (there is no one-step promote: `approve` ends a pause step, `set-weight` moves the weight).
            run = click.option("--full", is_flag=True,
                               help="Straight to 100%, skipping the steps left (what promote always does).")(run)
        rollout.command(name)(run)

    action("pause", "Hold the canary at its weight: no step advances until `resume` (a failing analysis "
                    "still aborts).", reason=True)
    action("resume", "Continue a paused canary; the next step or analysis look is one interval away.")
    action("abort", "Send all traffic back to stable now (the canary goes to 0%; a blue-green promotion "
                    "within its scale-down window swaps the old release back).")
    action("promote", "Make the canary stable now, skipping its steps left (`--full` says so): only a canary a "
                      "verified decision allows.")
    action("retry", "Restart an aborted rollout from step 0 with the same spec and canary release (refused unless "
                    "aborted; the canary's verified decision starts it again, a release BLOCKed since is refused).",
           bound=False)

    @rollout.command("approve")
    @click.argument("deployment")
    @click.option("--step", type=click.IntRange(min=0), default=None, metavar="N",
                  help="The pause step you approve, as `rollout get` showed it; with --canary and --started-at "
                       "(default: all three as the route shows them now, read first).")
    @click.option("--canary", "canary", default=None, metavar="RELEASE",
                  help="The canary release whose pause you approve, as `rollout get` showed it.")
    @click.option("--started-at", "started_at", type=TIME, default=None, metavar="T",
                  help="The rollout attempt whose pause you approve: its `started_at`, as `rollout get` showed it.")
    @json_option
    @click.pass_context
    @handle_errors
    def approve(ctx: click.Context, deployment: str, step: int | None, canary: str | None, started_at: float | None,
                as_json: bool) -> None:
        """Approve the pause step the rollout waits at: its next step runs now. The approval names the step, the
        canary release and the rollout attempt (read here, or the three you saw), and the router refuses it (exit 4)
        once the rollout is no longer there, so a second or retried approval never ends the next pause too, nor a
        pause of another canary or attempt (`resume` ends whatever pause holds the rollout)."""
        may_change()
        seen = (step, canary, started_at)
        if None in seen and any(v is not None for v in seen):
            # One read now binds the approval to whatever the route shows then, not to what was seen: before
            # (probe p17), `--step 1 --canary R` after an abort and a retry ended the new attempt's pause.
            raise ConfigError("--step, --canary and --started-at name the pause you saw (`rollout get` shows its step, "
                              "canary and started_at): give all three, or none to approve the pause the route "
                              "waits at now")
        client = admin(ctx)
        if started_at is None:  # all of it read now: bound to this very attempt
            now = client.call("GET", _at(deployment))
            step, canary = int(now.get("step", 0)), (now.get("canary") or {}).get("release", "")
            started_at = now.get("started_at")
        body = {"step": step, "canary": canary, "started_at": started_at}
        route = client.call("POST", _at(deployment, "/approve"), body)
        if as_json:
            emit_json(route)
        else:
            console.print(Text.assemble(f"approved step {body['step']} of {deployment}: ",
                                        shown(str(route.get("reason", "")))), highlight=False, soft_wrap=True)

    @rollout.command("watch")
    @click.argument("deployment")
    @click.option("--timeout", "timeout_s", type=FiniteFloat(min=0.1, max=WEEK_S), default=600.0, show_default=True,
                  help="Give up after this many seconds (exit code 5).")
    @click.option("--release", "release", default=None, metavar="RELEASE",
                  help="The release whose rollout to follow (a pipeline's own): exit 6 if the deployment rolls out "
                       "another one.")
    @json_option
    @click.pass_context
    @handle_errors
    def watch(ctx: click.Context, deployment: str, timeout_s: float, release: str | None, as_json: bool) -> None:
        """Follow the rollout live: a line per change (step, weights, analysis values against thresholds, last
        decision and reason), until it completes (exit 0) or aborts or is replaced by another rollout (exit 6);
        --json: one JSON object per line."""
        deadline = time.monotonic() + timeout_s
        client = admin(ctx)
        client.timeout_s = timeout_s
        last: dict[str, Any] | None = None
        # The rollout this watch follows: the first one it sees (or --release's). A PUT of another canary, or a
        # retry, while it runs is another rollout: its promotion is not this one's (probe p20 F10).
        mine: tuple[str, float | None] | None = None
        while time.monotonic() <= deadline:
            with contextlib.suppress(TimeoutError):  # the stream went idle past the deadline: timed out below
                # The router pushes each change (and a keepalive line when idle); the socket waits, nothing polls.
                for route in client.stream(_at(deployment, "/watch"), idle_s=min(timeout_s, 30.0)):
                    if time.monotonic() > deadline:
                        break
                    if route is None:
                        continue
                    now_on = attempt(route)
                    if mine is None:
                        if release is not None and now_on[0] != release:
                            raise RolloutAborted(f"{deployment} is rolling out {now_on[0] or 'nothing'}, not "
                                                 f"{release}")
                        mine = now_on
                    elif now_on != mine:
                        raise RolloutAborted(f"rollout of {mine[0]} on {deployment} was replaced by one of "
                                             f"{now_on[0] or 'nothing'}: {route.get('reason', '')}")
                    view = watch_view(route)
                    if view != last:
                        if as_json:
                            click.echo(json.dumps(view, separators=(",", ":")))
                        else:
                            console.print(watch_line(view), highlight=False, soft_wrap=True)
                        last = view
                    if finished(route):
                        if route.get("phase") == "aborted":
                            raise RolloutAborted(f"rollout of {deployment} aborted: {route.get('reason', '')}")
                        return
                else:
                    # The router ended the watch before the deadline: its key was revoked or rescoped away (the
                    # request below is refused, saying so), or the replica restarted (the watch opens again).
                    if time.monotonic() <= deadline:
                        client.call("GET", _at(deployment))
                        continue
            break
        raise WatchTimedOut(_not_done(deployment, last, timeout_s))

    @rollout.command("analysis")
    @click.argument("deployment")
    @click.option("--limit", default=10, type=click.IntRange(min=1), show_default=True, help="Recent analysis records to show.")
    @json_option
    @click.pass_context
    @handle_errors
    def analysis_cmd(ctx: click.Context, deployment: str, limit: int, as_json: bool) -> None:
        """Recent analysis measurements: each metric's value against its condition and threshold, the verdict,
        what the rollout did, and whether the record's signature verifies (exit 4 if one does not)."""
        settings = ctx.obj["settings"]
        rows = access.query(settings, "analysis_runs", direct=ctx.obj["direct"], deployment=deployment, limit=limit)
        if not rows:
            served(ctx, deployment)
        runs = verified_runs(settings, rows)
        if as_json:
            emit_json(runs)
        else:
            table(run_rows(runs), title=f"analysis of {deployment}", empty="no analysis recorded yet")
        bad = [r for r in runs if not r["verified"]]
        if bad:
            raise SignatureError(f"{len(bad)} of {len(runs)} analysis records of {deployment} do not verify: "
                                 f"{bad[0]['signature_error']}")

    @rollout.command("undo")
    @click.argument("deployment")
    @click.option("--to", "to", default=None, metavar="RELEASE",
                  help="An earlier known-good release (fully promoted and healthy here) whose current verified "
                       "gate decision allows it (not BLOCKed, awaiting review or undecided).")
    @json_option
    @click.pass_context
    @handle_errors
    def undo(ctx: click.Context, deployment: str, to: str | None, as_json: bool) -> None:
        """Put the previous release back as stable (blue-green: within the scale-down window), or with --to a
        named earlier known-good release."""
        may_change()
        route = admin(ctx).call("POST", _at(deployment, "/undo"), {"to": to} if to else None)
        if as_json:
            emit_json(route)
        else:
            console.print(route.get("reason", ""), highlight=False, soft_wrap=True)

    @rollout.command("set-weight")
    @click.argument("deployment")
    @click.argument("weight", type=PERCENT)
    @rollout_options
    @json_option
    @click.pass_context
    @handle_errors
    def set_weight(ctx: click.Context, deployment: str, weight: float, canary: str | None, started_at: float | None,
                   as_json: bool) -> None:
        """Change only the canary's weight (percent); a release no decision allows gets none."""
        may_change()
        client = admin(ctx)
        body = {"weight": weight} | aimed(client, deployment, canary, started_at)
        route = client.call("POST", _at(deployment, "/set-weight"), body)
        if as_json:
            emit_json(route)
        else:
            console.print(route.get("reason", ""), highlight=False, soft_wrap=True)

    @rollout.command("patch")
    @click.argument("deployment")
    @click.option("--weight", type=PERCENT, default=None, help="The canary's weight (percent).")
    @click.option("--canary-release", default=None, metavar="RELEASE",
                  help="A new canary release at the same step (it needs a verified decision allowing it).")
    @click.option("-f", "--filename", "file", type=click.Path(exists=True, dir_okay=False, allow_dash=True), default=None,
                  help="A JSON merge patch (RFC 7396) as a JSON or YAML file (- for stdin).")
    @click.option("--patch", "inline", default=None, metavar="JSON", help='A JSON merge patch, e.g. \'{"weight": 10}\'.')
    @json_option
    @click.pass_context
    @handle_errors
    def patch_cmd(ctx: click.Context, deployment: str, weight: float | None, canary_release: str | None,
                  file: str | None, inline: str | None, as_json: bool) -> None:
        """Change only what the patch names (weight, canary_release, strategy fields such as interval_s or
        analysis; null removes an optional one): the rollout keeps its phase, step and analysis, and the canary
        its endpoint. --weight and --canary-release apply on top of -f/--patch."""
        may_change()
        body = patch_body(weight, canary_release, file, inline)
        show(admin(ctx).call("PATCH", _at(deployment), body), as_json)

    @rollout.command("history")
    @click.argument("deployment")
    @click.option("--limit", default=30, type=click.IntRange(min=1), show_default=True)
    @json_option
    @click.pass_context
    @handle_errors
    def history(ctx: click.Context, deployment: str, limit: int, as_json: bool) -> None:
        """Every change of the deployment's route, newest first, with who or what made it and why."""
        rows = access.query(ctx.obj["settings"], "rollout_history", direct=ctx.obj["direct"],
                            deployment=deployment, limit=limit)
        if not rows:
            served(ctx, deployment)
        output(rows, as_json, title=f"rollout history of {deployment}",
               columns=None if as_json else ["time", "phase", "canary_weight", "stable_release",
                                             "canary_release", "actor", "reason"])
