"""The drift monitor keeps each tenant's windows of a deployment apart (served, an application's own, and a rollout's
canary and stable): a report compares one tenant's events and names that tenant. Pure.

Before, windows were keyed by deployment alone: another tenant's events naming the deployment (its application's
own NATS user may name any; an unscoped key reaches any) filled the deployment's windows, and a report said the
tenant of whichever event came last."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from lockgate.contracts import InferenceEvent
from lockgate.services.drift.domain import DriftMonitor, window_key, windows_of
from lockgate.services.drift.features import LABEL_CHARS, LABELS_MAX, code

pytestmark = pytest.mark.timeout(30)


def _events(n: int, tenant: str, *, tokens: int, variant: str = "stable", start: int = 0) -> list[InferenceEvent]:
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    return [InferenceEvent(app="support", tenant=tenant, deployment="d", variant=variant,
                           release="r2" if variant == "canary" else "r1", model="m", output_tokens=tokens + i % 3,
                           input_tokens=8, latency_ms=20.0 + i % 5, time=t0 + timedelta(seconds=start + i))
            for i in range(n)]


def test_windows_keys_name_tenant_deployment_events_and_app_and_the_default_tenant_keeps_its_served_keys() -> None:
    assert (window_key("default", "d", True), window_key("default", "d", False, "shop")) == ("d", "d#shop")
    for tenant in ("default", "acme", "app", "a.b@c/d"):
        for served in (True, False):
            for app in ("shop", "app", "x.y@z/w:1"):
                want = (tenant, "mix-a", served, "" if served else app)
                assert windows_of(window_key(tenant, "mix-a", served, app)) == want
    assert window_key("app", "d", True) != window_key("default", "d", False, "app")  # a tenant named `app` is its own
    assert window_key("acme", "d", False, "a") != window_key("acme", "d", False, "b")


@pytest.mark.parametrize("served", [True, False])
def test_another_tenants_events_fill_windows_of_their_own(served: bool) -> None:
    m = DriftMonitor(reference_size=40, window_size=40, psi_threshold=0.2)
    assert m.observe_events(_events(40, "acme", tokens=2), served=served) == []  # acme's reference
    # bravo's long answers naming acme's deployment, in one batch with acme's next short ones
    reports = m.observe_events([*_events(40, "bravo", tokens=400, start=40), *_events(40, "acme", tokens=2, start=80)],
                               served=served)
    (report,) = [r for r in reports if r.comparison == "now_vs_reference"]
    assert (report.tenant, report.deployment, report.served, report.drifted) == ("acme", "d", served, False)
    out = next(f for f in report.features if f.feature == "output_tokens")
    assert out.reference_mean == pytest.approx(out.current_mean)
    assert {windows_of(k)[:2] for k in m.windows} == {("acme", "d"), ("bravo", "d")}


def test_a_rollouts_canary_and_stable_windows_are_one_tenants() -> None:
    m = DriftMonitor(reference_size=40, window_size=40, psi_threshold=0.2)
    m.observe_events(_events(40, "acme", tokens=2))  # acme's stable answers, before any canary's
    # bravo's canary answers, three times longer, fill only bravo's canary window, whose stable side is empty
    assert [r for r in m.observe_events(_events(40, "bravo", tokens=6, variant="canary", start=40))
            if r.comparison == "canary_vs_stable"] == []
    both = [e for pair in zip(_events(40, "acme", tokens=2, variant="canary", start=80),
                              _events(40, "acme", tokens=2, start=80), strict=True) for e in pair]
    (report,) = [r for r in m.observe_events(both) if r.comparison == "canary_vs_stable"]
    assert (report.tenant, report.release, report.reference_release, report.drifted) == ("acme", "r2", "r1", False)
    # A rollout's end, and a promotion, reach every tenant's windows of the deployment.
    assert m.end_rollout("d") == {window_key("acme", "d", True), window_key("bravo", "d", True)}
    m.observe_events(_events(40, "other", tokens=2), served=False)
    m.reset("d")
    assert m.windows == {} and m.pairs == {}


def test_each_tenant_names_its_categories_from_a_bounded_table_of_its_own() -> None:
    """One table of category names for every tenant, kept first come: bravo's events with made-up model names filled
    it, and acme's reports named their drifting category by its code (`finish_reason:#...`). Now each tenant has its
    own table of at most LABELS_MAX names, the least recently seen going first."""
    m = DriftMonitor(reference_size=40, window_size=40, psi_threshold=0.2)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    flood = [InferenceEvent(app="support", tenant="bravo", deployment="b", model=f"made-up-{i}", time=t0)
             for i in range(LABELS_MAX + 10)]
    m.observe_events(flood, served=False)
    assert len(m.labels_of("bravo", "support")) == LABELS_MAX  # bounded: the least recently seen went
    assert "made-up-0" not in m.labels_of("bravo", "support").values() and f"made-up-{LABELS_MAX + 9}" in m.labels_of(
        "bravo", "support").values()
    m.observe_events(_events(40, "acme", tokens=2))
    ended = [msgspec.structs.replace(e, finish_reason="length") for e in _events(40, "acme", tokens=2, start=40)]
    (report,) = m.observe_events(ended)
    assert (report.tenant, report.drifted) == ("acme", True)
    assert "finish_reason:length" in {f.feature for f in report.features if f.drifted}
    assert len(m.labels_of("acme")) <= LABELS_MAX


def test_a_category_name_is_kept_to_label_chars() -> None:
    m = DriftMonitor(reference_size=40, window_size=40, psi_threshold=0.2)
    long = "m" * 100_000
    m.observe_events([InferenceEvent(app="support", tenant="acme", deployment="d", model=long,
                                     time=datetime(2025, 1, 1, tzinfo=UTC))])
    assert m.labels_of("acme")[code(long)] == "m" * LABEL_CHARS + "..."


@pytest.mark.parametrize("served", [True, False])
def test_an_apps_made_up_categories_never_push_out_the_names_another_apps_or_the_served_windows_hold(
        served: bool) -> None:
    """Probe p13: one table of names per tenant, filled by any of its applications. App `junk`'s LABELS_MAX made-up
    model names, between the reference and the window of app support's own (or the router's served) windows, pushed
    out `stop`, the category the answers stopped ending with, and the report named it by code (`finish_reason:#...`),
    which no rule naming `finish_reason:stop` matches. Now each application, and the tenant's served events, has a
    table of its own."""
    m = DriftMonitor(reference_size=40, window_size=40, psi_threshold=0.2)
    m.observe_events([msgspec.structs.replace(e, finish_reason="stop") for e in _events(40, "acme", tokens=2)],
                     served=served)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    m.observe_events([InferenceEvent(app="junk", tenant="acme", deployment="j", model=f"made-up-{i}", time=t0)
                      for i in range(LABELS_MAX)], served=False)
    window = [msgspec.structs.replace(e, finish_reason=("length", "content_filter")[i % 2])
              for i, e in enumerate(_events(40, "acme", tokens=2, start=40))]
    (report,) = [r for r in m.observe_events(window, served=served) if r.comparison == "now_vs_reference"]
    finish = next(f for f in report.features if f.feature.startswith("finish_reason:"))
    assert (finish.feature, finish.reference_mean, finish.current_mean) == ("finish_reason:stop", 1.0, 0.0)
    assert len(m.labels_of("acme", "junk")) == LABELS_MAX  # junk's names push out junk's own only


def test_only_the_served_events_and_applications_holding_windows_keep_a_table_of_names() -> None:
    """A tenant holds at most 1 + max_windows tables: an application's goes with its last window set (evicted,
    reset by a promotion) and none is kept for one whose events the cap refuses."""
    m = DriftMonitor(reference_size=4, window_size=4, psi_threshold=0.2, max_windows=2)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)

    def send(app: str, deployment: str, served: bool = False) -> None:
        m.observe_events([InferenceEvent(app=app, tenant="acme", deployment=deployment, model=f"{app}-model",
                                         time=t0)], served=served)

    send("a0", "d0")
    send("a1", "d1")
    for i in range(2, 10):  # at the cap, each app within its share: refused, no table
        send(f"a{i}", f"d{i}")
    assert set(m.labels) == {("acme", "a0"), ("acme", "a1")}
    send("a1", "d0")  # a1 within its share gives up its own d1 for its d0: a1 holds a set, and its table
    assert set(m.labels) == {("acme", "a0"), ("acme", "a1")}
    assert m.labels_of("acme", "a1")[code("a1-model")] == "a1-model"
    send("router", "chat", served=True)  # a served set takes the least recently seen, a0's only one, and its table
    assert set(m.labels) == {("acme", "a1"), ("acme", "")}
    m.reset("d0")  # a promotion: a1's only set goes, and its table; the served one stays
    assert set(m.labels) == {("acme", "")} and set(m.windows) == {window_key("acme", "chat", True)}
