"""The drift monitor's state is bounded whatever an application sends: a tenant holds at most `max_windows` window
sets, application windows are evicted past it (served ones never) from the app holding the most, never from an app
within its fair share, a start restores only what the cap holds, and text rings take memory only once a text is
embedded into them. Pure.

Found by probe p6: an unscoped app key sent one event per made-up deployment name; each name kept a window set of
~4 MB (text rings allocated whole at once), never evicted, saved to KV and restored at the next start: 5,000 events
took the embedded stack past 11 GB. Probe p7: the cap evicted the tenant's least recently seen application windows
whichever app they were, so one app naming made-up deployments between another's batches evicted the other's
windows before they ever held a report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from lockgate.contracts import InferenceEvent
from lockgate.services.drift import text
from lockgate.services.drift.domain import DriftMonitor, evictee, restorable, window_key, windows_of
from lockgate.services.drift.windows import Ring

pytestmark = pytest.mark.timeout(30)


def _events(deployment: str, tenant: str = "acme", n: int = 1, *, texts: bool = True,
            app: str = "support") -> list[InferenceEvent]:
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    return [InferenceEvent(app=app, tenant=tenant, deployment=deployment, variant="stable", release="r1",
                           model="m", output_tokens=5 + i % 3, input_tokens=8, latency_ms=20.0,
                           prompt="what is the weather" if texts else "", response="sunny all day" if texts else "",
                           time=t0 + timedelta(seconds=i)) for i in range(n)]


def _apps(m: DriftMonitor, tenant: str = "acme") -> list[str]:
    """The tenant's application windows' deployments, least recently seen first."""
    return [windows_of(k)[1] for k, w in m.windows.items() if w.tenant == tenant and not windows_of(k)[2]]


def test_a_tenant_holds_at_most_the_cap_and_the_least_recently_seen_application_windows_go() -> None:
    m = DriftMonitor(reference_size=50, window_size=50, psi_threshold=0.2, max_windows=4)
    m.observe_events(_events("chat", n=10))  # served: the router's
    m.observe_events(_events("other", tenant="bravo"), served=False)  # another tenant's, never counted with acme's
    for i in range(10):
        m.observe_events(_events(f"junk-{i}"), served=False)
    assert sum(w.tenant == "acme" for w in m.windows.values()) == 4
    assert window_key("acme", "chat", True) in m.windows and m.windows[window_key("acme", "chat", True)].ref.n == 10
    assert _apps(m) == ["junk-7", "junk-8", "junk-9"]
    assert m.evicted == [window_key("acme", f"junk-{i}", False, "support") for i in range(7)]
    assert m.capped == {"acme"} and _apps(m, "bravo") == ["other"]

    # Seen again, junk-7 is the most recent: the next new name evicts junk-8, the least recently seen.
    m.evicted.clear()
    m.observe_events(_events("junk-7"), served=False)
    m.observe_events(_events("junk-10"), served=False)
    assert _apps(m) == ["junk-9", "junk-7", "junk-10"] and m.evicted == [window_key("acme", "junk-8", False, "support")]
    # An application's events never evict served windows, however many names they use.
    m.observe_events([e for i in range(100) for e in _events(f"more-{i}")], served=False)
    assert window_key("acme", "chat", True) in m.windows and len(_apps(m)) == 3


def test_served_windows_are_never_evicted_and_an_application_gets_none_while_served_ones_fill_the_cap() -> None:
    m = DriftMonitor(reference_size=50, window_size=50, psi_threshold=0.2, max_windows=2)
    m.observe_events(_events("junk-0"), served=False)
    m.observe_events(_events("a"))
    m.observe_events(_events("b"))  # a served newcomer evicts the application's windows
    assert _apps(m) == [] and m.evicted == [window_key("acme", "junk-0", False, "support")]
    m.observe_events(_events("c"))  # served: kept beyond the cap (bounded by what the routers serve)
    assert m.observe_events(_events("junk-1", n=60), served=False) == []  # not watched: no room
    assert sorted(m.windows) == sorted(window_key("acme", d, True) for d in "abc")


@pytest.mark.parametrize(("sets", "asker", "want"), [
    # The app holding the most loses its least recently seen set, to another app's new one as to its own.
    ([("a1", "a"), ("v1", "v"), ("a2", "a"), ("a3", "a")], "v", "a1"),
    ([("v1", "v"), ("a1", "a"), ("a2", "a"), ("a3", "a")], "a", "a1"),
    # Within its fair share (cap 4 over 2 apps: 2) an app loses none to another's new set: the asker churns its own.
    ([("v1", "v"), ("v2", "v"), ("a1", "a"), ("a2", "a")], "a", "a1"),
    # Beyond its share and holding the most, an app loses a set to another's new one.
    ([("v1", "v"), ("v2", "v"), ("v3", "v"), ("a1", "a")], "a", "v1"),
    # On a tie the asker gives up its own (its new set counted), else the least recently seen app's goes.
    ([("v1", "v"), ("v2", "v"), ("v3", "v"), ("a1", "a"), ("a2", "a")], "a", "a1"),
    ([("v1", "v"), ("v2", "v"), ("a1", "a"), ("a2", "a")], None, "v1"),
    # A new app with every app within its share (4 over 4 apps: 1 each) gets no set: its events are not watched.
    ([("v1", "v"), ("a1", "a"), ("b1", "b"), ("c1", "c")], "d", None),
    # A served newcomer is never refused: it takes from the app holding the most, whatever its share.
    ([("v1", "v"), ("a1", "a"), ("b1", "b"), ("c1", "c")], None, "v1"),
    ([("v1", "v"), ("a1", "a"), ("a2", "a")], None, "a1"),
    # Nothing to evict.
    ([], "a", None),
])
def test_the_cap_evicts_from_the_app_holding_the_most_never_from_one_within_its_fair_share(
        sets: list[tuple[str, str]], asker: str | None, want: str | None) -> None:
    assert evictee(sets, 4, asker) == want


def test_an_app_naming_made_up_deployments_churns_only_its_own_windows_never_another_apps() -> None:
    """Probe p7: app `aapp` named fresh deployments between app `vapp`'s batches; vapp's windows, the least
    recently seen, were evicted each time and never reached a report. Now aapp only churns its own."""
    m = DriftMonitor(reference_size=50, window_size=50, psi_threshold=0.2, max_windows=6)
    reports = []
    for rnd in range(4):
        reports += m.observe_events(_events("vdep", n=25, app="vapp"), served=False)
        for i in range(20):
            m.observe_events(_events(f"junk-{rnd}-{i}", app="aapp"), served=False)
        assert window_key("acme", "vdep", False, "vapp") in m.windows
        assert all(windows_of(k)[1].startswith("junk-") for k in m.evicted)
    assert [(r.app, r.deployment, r.current_n) for r in reports] == [("vapp", "vdep", 50)]
    assert len(_apps(m)) == 6 and _apps(m)[-5:] == [f"junk-3-{i}" for i in range(15, 20)]
    # A third app gets its fair share (6 over 3 apps: 2) from aapp, the app holding the most; vapp keeps its one.
    for d in ("w1", "w2"):
        m.observe_events(_events(d, app="wapp"), served=False)
    held = [windows_of(k)[3] for k in m.windows if not windows_of(k)[2]]
    assert sorted(held) == ["aapp", "aapp", "aapp", "vapp", "wapp", "wapp"]


def test_a_start_restores_served_windows_and_each_tenants_most_recently_saved_application_windows_up_to_the_cap(
) -> None:
    saved = {window_key("acme", "chat", True): 1.0, window_key("acme", "old", False, "support"): 2.0,
             window_key("acme", "new", False, "support"): 9.0, window_key("acme", "mid", False, "support"): 5.0,
             window_key("bravo", "x", False, "support"): 0.0, window_key("acme", "legacy", False, "support"): 0.0}
    keep, drop = restorable(saved, 3)
    # least recently saved first, as the monitor keeps them (the next eviction takes the first)
    assert keep == [window_key("bravo", "x", False, "support"), window_key("acme", "chat", True),
                    window_key("acme", "mid", False, "support"), window_key("acme", "new", False, "support")]
    assert sorted(drop) == sorted([window_key("acme", "old", False, "support"), window_key("acme", "legacy", False, "support")])
    # served windows are restored even beyond the cap; no application windows beside them then
    served = {window_key("acme", d, True): 1.0 for d in "abc"} | {window_key("acme", "app", False, "support"): 9.0}
    assert restorable(served, 2) == ([window_key("acme", d, True) for d in "abc"], [window_key("acme", "app", False, "support")])


def test_text_rings_take_memory_only_for_embedded_texts_as_float32_and_grow_as_rows_come() -> None:
    m = DriftMonitor(reference_size=500, window_size=500, psi_threshold=0.2, embedder=text.HASHING)
    m.text_stride = 1  # every row's texts embedded
    m.observe_events(_events("silent", n=3, texts=False), served=False)
    quiet = m.windows[window_key("acme", "silent", False, "support")]
    assert quiet.text_ref.text is None and quiet.cur.text is None  # no text: no text vectors at all
    assert np.isnan(quiet.text_ref.ordered()[2]).all() and quiet.text_ref.ordered()[2].shape == (3, 2, 256)

    m.observe_events(_events("talks", n=3), served=False)
    w = m.windows[window_key("acme", "talks", False, "support")]
    assert w.text_ref.text is not None and w.text_ref.text.dtype == np.float32
    assert w.text_ref.text.nbytes <= 16 * 2 * 256 * 4  # room for the rows that came, not 500 float64 rows
    got = w.text_ref.ordered()[2]
    assert got.dtype == np.float64 and got.shape == (3, 2, 256)  # the statistics read float64
    want = text.hashing_vectors(["what is the weather"])[0]
    assert np.allclose(got[:, 0], want, atol=1e-6)

    # Grown, and wrapped, a ring holds what an eager one did.
    ring, eager = Ring(40, 3), np.full((40, 2, 3), np.nan)
    rng = np.random.default_rng(1)
    pos = 0
    for k in (1, 5, 0, 20, 30, 7):
        vectors = rng.normal(size=(k, 2, 3))
        vectors[::2] = np.nan  # rows without texts
        ring.push(np.zeros((k, len(ring.values[0]))), np.zeros(k), vectors)
        eager[(pos + np.arange(k)) % 40] = vectors[-40:]
        pos = (pos + k) % 40
    order = (ring.pos - ring.n + np.arange(ring.n)) % 40
    assert np.allclose(ring.ordered()[2], eager[order].astype(np.float32), equal_nan=True)


def test_an_app_naming_another_apps_deployment_fills_a_set_of_its_own_and_never_owns_or_evicts_the_others() -> None:
    """An app's events naming another app's deployment made it the holder of that app's window set (the set's app
    was the last event's): counted as its own, the set was evicted for the claimer's made-up names, and the victim's
    reports stopped; the claimer's events also filled the victim's windows. Now each app's events fill its own set."""
    m = DriftMonitor(reference_size=50, window_size=50, psi_threshold=0.2, max_windows=4)
    victim = window_key("acme", "vdep", False, "vapp")
    reports = m.observe_events(_events("vdep", n=25, app="vapp"), served=False)
    for rnd in range(3):
        # The claim: one event naming vapp's deployment, then fresh made-up names, each round.
        m.observe_events(_events("vdep", app="aapp"), served=False)
        m.observe_events([e for i in range(6) for e in _events(f"junk-{rnd}-{i}", app="aapp")], served=False)
        assert victim in m.windows and m.windows[victim].app == "vapp"
        assert victim not in m.evicted
    reports += m.observe_events(_events("vdep", n=75, app="vapp"), served=False)
    # vapp's report compares vapp's 100 events alone (none of aapp's), and says so.
    assert [(r.app, r.deployment, r.reference_n, r.current_n) for r in reports] == [("vapp", "vdep", 50, 50)]
    assert m.windows[victim].since_report == 0  # no event past vapp's window: none of aapp's
    # aapp's events naming vdep are in a set of aapp's, which aapp's own names may churn.
    assert {windows_of(k)[3] for k in m.windows if windows_of(k)[1] == "vdep"} <= {"vapp", "aapp"}
    assert all(windows_of(k)[3] == "aapp" for k in m.evicted)
