"""Pure drift monitoring: per-deployment windows of feature rows (features.py) in numpy arrays, no I/O.

Two comparisons, each a DriftReport:
- now_vs_reference: the first `reference_size` rows (after a promotion: the promoted release's, observed after
  it, see `DriftMonitor.restart`) are the reference; every `window_size` rows after it, the latest `window_size` rows are
  compared with it;
- canary_vs_stable: during a rollout, every `window_size` canary rows, the canary's latest window is
  compared with the stable variant's window of the same deployment (once that holds as many), both of rows of
  the same time: the busier arm keeps one row per row of the other (windows.Pair.admit), and windows whose
  time spans overlap by less than MIN_OVERLAP are not compared (`same_time`).

Per feature the test is chosen by sample size and type (stats.drift_test) and PSI is reported alongside.
A categorical feature is named `feature:category` after the category whose share moved most, its means
being that category's share in either window, and `ks_stat`/`ks_pvalue` (v1's names) its chi-squared test, which
the query service gives as `chi2_stat`/`chi2_pvalue`. Texts are
embedded once per batch (text.Embedder) and compared by text.mean_distance_test; only vectors are kept.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import numpy as np

from lockgate.contracts import DriftReport, FeatureDrift, InferenceEvent, InferenceScored
from lockgate.services.drift import stats, text
from lockgate.services.drift.features import CATEGORICAL, FEATURES, KINDS, TEXTS, Rows, code, learn, rows
from lockgate.services.drift.snapshots import Snapshot, restore, snapshot
from lockgate.services.drift.windows import Pair, Ring, Windows

__all__ = ["CATEGORICAL", "FEATURES", "DriftMonitor", "Ring", "Snapshot", "Windows", "code", "evictee", "restore",
           "snapshot"]

_TEXT_CHARS = 2000  # what of a long text is embedded: its topic shows in the start, the cost grows with it
# Texts embedded per window at most: every k-th row's texts, k = window_size // TEXT_ROWS. A permutation test
# on 200 texts a side sees a change of topic; embedding every event would cost more than all other features.
TEXT_ROWS = 200
# The share of the longer window's time span both arms' windows must share for a canary-versus-stable report.
MIN_OVERLAP = 0.5
_HUGE = 1e150  # beyond this a window's values are rescaled before their means and spreads (see _numeric)


def deployment_of(event: InferenceEvent | InferenceScored) -> str:
    """Events without a deployment are watched per app."""
    return event.deployment or event.app


# The now-versus-reference windows of the events no router served (an application's own) are kept apart
# from the served ones, under the deployment's name, '#' and the application's ('#' is in no name): an
# application's events neither sway the served windows, whose reports move traffic, nor hide drift in them.
# They are one application's: another application's events naming the deployment fill a set of their own, so
# they never count toward, own or evict it (keyed by deployment alone, the set was the app's whose event came last,
# and another app naming the deployment, counted as its holder, evicted it as its own: the first app's reports
# stopped, found in review after probe p7).
UNSERVED = "#"
# Every window is one tenant's: its events are stored as that tenant's (the subject's tenant, or the API key's),
# and a tenant may name any deployment (an application's own NATS user names the deployment it likes; an unscoped
# key reaches every deployment), so the windows are kept per tenant and each report says whose events it compares:
# another tenant's never fill a deployment's own windows, and the router and the gate judge a release only on
# reports of its own tenant. A tenant's windows are keyed after '~' (in no name, like '#'); the default tenant's
# served ones keep the keys they had before tenants were kept apart, so a stack of one tenant restarts into them.
DEFAULT_TENANT = "default"
_TENANT = "~"


def window_key(tenant: str, deployment: str, served: bool, app: str = "") -> str:
    """The key of a tenant's now-versus-reference windows of a deployment: its served ones, or `app`'s own (the
    served key also keys the tenant's canary-versus-stable windows of the deployment)."""
    key = deployment if tenant == DEFAULT_TENANT else f"{deployment}{_TENANT}{tenant}"
    return key if served else f"{key}{UNSERVED}{app}"


def windows_of(key: str) -> tuple[str, str, bool, str]:
    """The (tenant, deployment, served, app) a windows key is of (app: '' for served windows)."""
    base, unserved, app = key.partition(UNSERVED)
    deployment, sep, tenant = base.partition(_TENANT)
    return (tenant if sep else DEFAULT_TENANT), deployment, not unserved, app


def restorable(saved: dict[str, float], cap: int) -> tuple[list[str], list[str]]:
    """Of saved windows (key -> when saved), those a start restores, least recently saved first, and those beyond
    the cap: every served one, and beside them a tenant's most recently saved application windows while the tenant
    holds fewer than `cap` (as DriftMonitor keeps them)."""
    held: dict[str, int] = {}
    for key in saved:
        tenant, _, served, _ = windows_of(key)
        held[tenant] = held.get(tenant, 0) + served
    keep, drop = [], []
    for key in sorted(saved, key=lambda k: (saved[k], k), reverse=True):
        tenant, _, served, _ = windows_of(key)
        if served or held[tenant] < cap:
            keep.append(key)
            held[tenant] += not served
        else:
            drop.append(key)
    return keep[::-1], drop


def deployment_named(key: str) -> str:
    """The deployment a windows key is of."""
    return windows_of(key)[1]


# Window sets a tenant holds at most (served and an application's together): an application's events may name
# any deployment (an unscoped key, its NATS user), and each name kept its windows for good (probe p6: 5,000
# made-up names took the embedded stack past 11 GB). Past it, application windows go (`evictee`); served ones
# (the router's events, of deployments someone rolled out) never do.
MAX_WINDOWS = 64


def evictee(sets: Sequence[tuple[str, str]], cap: int, asker: str | None) -> str | None:
    """Which of a tenant's application window sets, (key, app) least recently seen first, goes to make room for one
    more when the tenant holds `cap`: the least recently seen set of the app holding the most, counting the new set
    in its asker's (`asker` None: a served one). None: none may go.

    An app holding no more than its fair share (the cap over the tenant's apps, the asker included, at least 1)
    loses none to another app's new set: the cap is every app's of the tenant, and the tenant's least recently
    seen set whichever its app was went before, so an app naming made-up deployments between another's batches
    evicted that app's windows before they ever held a report (probe p7). The asker may always give up its own.
    A served set is never refused: it takes from the app holding the most, whatever its share."""
    held: dict[str, list[str]] = {}
    for key, app in sets:
        held.setdefault(app, []).append(key)
    share = max(1, cap // len(held.keys() | {asker})) if asker is not None else 0
    fits = [app for app in held if asker is None or app == asker or len(held[app]) > share]
    if not fits:
        return None
    seen = {key: i for i, (key, _) in enumerate(sets)}
    # The most sets first (the asker's new one counted: on a tie it churns its own), then the least recently seen.
    return held[min(fits, key=lambda a: (-len(held[a]) - (a == asker), a != asker, seen[held[a][0]]))][0]


class DriftMonitor:
    """Feeds events into per-deployment windows; returns a DriftReport every `window_size` events (and
    every `window_size` canary events during a rollout). A tenant holds at most `max_windows` window sets (served
    ones beyond it only when they alone fill it); `windows` is in the order they were last seen, least recent first."""

    def __init__(self, reference_size: int, window_size: int, psi_threshold: float, bins: int = 10,
                 embedder: text.Embedder | None = None, max_windows: int = MAX_WINDOWS) -> None:
        self.reference_size = max(1, reference_size)
        self.window_size = max(1, window_size)
        self.psi_threshold = psi_threshold
        self.bins = bins
        self.embedder = embedder  # None: no text drift
        self.dim = embedder.dim if embedder is not None else 0
        self.max_windows = max(1, max_windows)
        self.windows: dict[str, Windows] = {}
        self.pairs: dict[str, Pair] = {}
        # What the cap took since the edge last looked (it deletes their snapshots and logs once per tenant):
        # keys of evicted windows, and the tenants whose windows were at the cap.
        self.evicted: list[str] = []
        self.capped: set[str] = set()
        # Per (tenant, app), category code -> value, to name drifting categories (features.LABELS_MAX each, least
        # recently seen first); app '' is the tenant's served events' (the router's). One table per tenant was
        # filled by any of its applications: one app's made-up values pushed out the names another app's windows
        # held, and its reports named them by code (probe p13). Only an app holding window sets keeps a table, so a
        # tenant holds at most 1 + max_windows of them.
        self.labels: dict[tuple[str, str], OrderedDict[float, str]] = {}
        # Per deployment, the release its now-versus-reference windows are of and from when (Unix seconds) its served
        # events count: its promotion's (see `restart`).
        self.serving: dict[str, tuple[str, float]] = {}
        self.text_stride = max(1, self.window_size // TEXT_ROWS)
        self._rows_seen = 0  # rows offered for embedding, to pick every text_stride-th

    def keys_of(self, deployment: str) -> set[str]:
        """The keys of every tenant's windows of a deployment (served and others)."""
        return {k for k in (*self.windows, *self.pairs) if deployment_named(k) == deployment}

    def reset(self, deployment: str) -> None:
        """Forget a deployment's windows, every tenant's (after a promotion the new traffic is the reference)."""
        gone = self.keys_of(deployment)
        for key in gone:
            self.windows.pop(key, None)
            self.pairs.pop(key, None)
        held = {(w.tenant, windows_of(k)[3]) for k, w in self.windows.items()}
        for key in gone:
            tenant, _, served, app = windows_of(key)
            if not served and (tenant, app) not in held:
                self.labels.pop((tenant, app), None)

    def restart(self, deployment: str, release: str, since: float) -> None:
        """A promotion (or a rollback): forget the deployment's windows; from now on its served events observed
        before `since` are no one's, and its now-versus-reference windows take only `release`'s. The old release's
        answers (in flight at the promotion, or a batch this monitor reads after the promotion's message, which it
        reads on another consumer) filled the promoted release's new reference otherwise, and a steady release
        drifted against its predecessor and was rolled back (probe p69 F2)."""
        self.reset(deployment)
        self.serving[deployment] = (release, since)

    def _since(self, e: InferenceEvent | InferenceScored) -> bool:
        """A served event observed since its deployment's promotion (a score's time is its answer's)."""
        return e.time.timestamp() >= self.serving.get(deployment_of(e), ("", 0.0))[1]

    def _serving(self, group: Sequence[InferenceEvent | InferenceScored], deployment: str) -> np.ndarray | None:
        """Which of a deployment's served events are of its promoted release (None: all): a new canary's fill its
        own window, not the deployment's. An event naming no release is kept (events of routers before they did)."""
        release = self.serving.get(deployment, ("", 0.0))[0]
        if not release:
            return None
        keep = np.array([not e.release or e.release == release for e in group], dtype=bool)
        return None if keep.all() else keep

    def end_rollout(self, deployment: str) -> set[str]:
        """A rollout ended (promoted or aborted): no canary window until the next canary's traffic, in any
        tenant's windows; returns the keys of the windows it changed."""
        ended = {k for k in self.keys_of(deployment) if k in self.pairs}
        for key in ended:
            self.pairs[key].new_canary("")
        return ended

    def labels_of(self, tenant: str, app: str = "") -> OrderedDict[float, str]:
        """The table of category names of a tenant's application (app '': of its served events)."""
        return self.labels.setdefault((tenant, app), OrderedDict())

    def labels_for(self, key: str) -> OrderedDict[float, str] | None:
        """The table of category names that names a windows key's categories (None: none yet)."""
        tenant, _, _, app = windows_of(key)
        return self.labels.get((tenant, app))

    def learn(self, tenant: str, names: Mapping[float, str], app: str = "") -> None:
        """Names of categories the windows of a tenant's application (app '': its served ones) hold (restored
        ones), as the most recently seen."""
        learn(self.labels_of(tenant, app), names)

    def vectors(self, batch: Rows) -> np.ndarray | None:
        """(n, 2, dim) embeddings of the batch's prompts and answers (NaN where absent or not sampled)."""
        if self.embedder is None:
            return None
        n = len(batch.prompts)
        sampled = [i for i in range(n) if (self._rows_seen + i) % self.text_stride == 0]
        self._rows_seen += n
        out = np.full((n, len(TEXTS), self.dim), math.nan)
        for t, texts in enumerate((batch.prompts, batch.responses)):
            idx = [i for i in sampled if texts[i]]
            if idx:
                out[idx, t] = self.embedder.embed([texts[i][:_TEXT_CHARS] for i in idx])  # type: ignore[index]
        return out

    def observe_events(self, events: Sequence[InferenceEvent | InferenceScored], *,
                       served: bool = True) -> list[DriftReport]:
        """Group a batch by tenant and deployment (and app, unless `served`) and observe each group as a whole, and
        by variant when `served` (answers a router served: an application's events fill neither a canary's nor its
        stable's window, and their now-versus-reference windows are their own app's)."""
        groups: dict[tuple[str, str, str], list[InferenceEvent | InferenceScored]] = {}
        for e in events:
            if not served or self._since(e):
                groups.setdefault((e.tenant, deployment_of(e), "" if served else e.app), []).append(e)
        reports: list[DriftReport] = []
        for (tenant, deployment, app), group in groups.items():
            batch = rows(group, self.labels_of(tenant, app))
            vectors = self.vectors(batch)
            keep = self._serving(group, deployment) if served else None
            if keep is None:
                reports += self.observe(deployment, batch.values, batch.times, app=group[-1].app, tenant=tenant,
                                        vectors=vectors, served=served)
            elif keep.any():
                reports += self.observe(deployment, batch.values[keep], batch.times[keep], app=group[-1].app,
                                        tenant=tenant, vectors=None if vectors is None else vectors[keep], served=True)
            if served:
                reports += self.observe_variants(deployment, group, batch, vectors, tenant=tenant)
        return reports

    def observe(self, deployment: str, values: np.ndarray, times: np.ndarray, *, app: str = "",
                tenant: str = "default", vectors: np.ndarray | None = None, served: bool = True) -> list[DriftReport]:
        """Append rows to the tenant's windows of the deployment (its served or its other ones); one report per
        `window_size` rows past the reference."""
        key = window_key(tenant, deployment, served, app)
        w = self.windows.pop(key, None)  # put back last: the most recently seen
        if w is None:
            if not self._room(tenant, app, served):
                return []
            w = Windows(self.reference_size, self.window_size, self.dim, app=app, tenant=tenant)
        self.windows[key] = w
        w.app = app or w.app  # an application's own set is keyed by its app: only served sets' apps change
        if self.dim and not w.text_ref.full:
            w.text_ref.fill(values, times, vectors)
        i = w.ref.fill(values, times, None)
        reports: list[DriftReport] = []
        while i < len(values):
            # Copy in chunks that end exactly at the next report boundary.
            k = min(len(values) - i, w.window_size - w.since_report)
            w.cur.push(values[i:i + k], times[i:i + k], None if vectors is None else vectors[i:i + k])
            w.since_report += k
            i += k
            if w.since_report >= w.window_size:
                w.since_report = 0
                reports.append(self.report(deployment, w, served=served))
        return reports

    def _room(self, tenant: str, app: str, served: bool) -> bool:
        """Make room for one more of the tenant's window sets past the cap, evicting application windows as
        `evictee` chooses them. False if none may go for an application's (its events are not watched); a served
        one is kept even then (never evicted, it cannot be refused either)."""
        mine = [k for k, w in self.windows.items() if w.tenant == tenant]
        excess = len(mine) - self.max_windows + 1
        if excess <= 0:
            return True
        self.capped.add(tenant)
        # Each set's app is the one in its key, whose events alone fill it (not whichever event came last).
        sets = [(k, windows_of(k)[3]) for k in mine if not windows_of(k)[2]]
        asker = None if served else app
        for _ in range(excess):
            key = evictee(sets, self.max_windows, asker)
            if key is None:
                self._forget(tenant, asker, sets)  # its events are not watched: their names need no table
                return served
            sets = [s for s in sets if s[0] != key]
            del self.windows[key]
            self.pairs.pop(key, None)
            self.evicted.append(key)
            if windows_of(key)[3] != asker:
                self._forget(tenant, windows_of(key)[3], sets)
        return True

    def _forget(self, tenant: str, app: str | None, sets: Sequence[tuple[str, str]]) -> None:
        """Drop the table of names of a tenant's application that holds none of these window sets (so a tenant keeps
        no more tables than it holds sets)."""
        if app and all(a != app for _, a in sets):
            self.labels.pop((tenant, app), None)

    def observe_variants(self, deployment: str, group: Sequence[InferenceEvent | InferenceScored], batch: Rows,
                         vectors: np.ndarray | None, *, tenant: str = DEFAULT_TENANT) -> list[DriftReport]:
        """Stable rows fill the stable window; canary rows the canary's, one report per `window_size` of them (the
        tenant's windows of the deployment: `group` is that tenant's events)."""
        variants = np.array([e.variant for e in group])
        stable, canary = np.flatnonzero(variants == "stable"), np.flatnonzero(variants == "canary")
        if not len(canary) and not len(stable):
            return []  # shadow or preview traffic only
        key = window_key(tenant, deployment, True)
        p = self.pairs.get(key)
        if p is None:
            p = self.pairs[key] = Pair(self.window_size, self.dim)
        if len(stable):
            p.stable_release = group[stable[-1]].release or p.stable_release
        if len(canary):
            releases = [group[i].release for i in canary]
            changed = [j for j, r in enumerate(releases) if r != (releases[j - 1] if j else p.canary_release)]
            if changed:  # a new canary: only its own rows count
                p.new_canary(releases[changed[-1]])
                canary = canary[changed[-1]:]
        # Each arm's window keeps rows of the same time as the other's (windows.Pair.admit), in arrival order.
        arrived = np.sort(np.concatenate([stable, canary]))
        kept = arrived[p.admit(variants[arrived] == "canary")]
        stable, canary = kept[variants[kept] == "stable"], kept[variants[kept] == "canary"]

        def push(ring: Ring, idx: np.ndarray) -> None:
            ring.push(batch.values[idx], batch.times[idx], None if vectors is None else vectors[idx], batch.units[idx])

        reports: list[DriftReport] = []
        i = j = 0
        while i < len(canary):
            k = min(len(canary) - i, p.window_size - p.since_report)
            rows_ = canary[i:i + k]
            # Stable's rows up to the chunk's last canary row, not the batch's later ones: a report compares each
            # arm's rows up to the same row.
            upto = int(np.searchsorted(stable, rows_[-1]))
            push(p.stable, stable[j:upto])
            push(p.canary, rows_)
            p.since_report += k
            i, j = i + k, upto
            if p.since_report >= p.window_size:
                p.since_report, p.due = 0, True
                reports += self._pair_report(deployment, p, group[-1])
        push(p.stable, stable[j:])
        return reports + self._pair_report(deployment, p, group[-1])

    def _pair_report(self, deployment: str, p: Pair, last: InferenceEvent | InferenceScored) -> list[DriftReport]:
        if not p.due or not p.stable.full:
            return []
        ref_values, ref_times, ref_text = p.stable.ordered()
        cur_values, cur_times, cur_text = p.canary.ordered()
        if not same_time(ref_times, cur_times):
            return []  # not comparable yet (as a stable window not yet full): due until both cover the same time
        p.due = False
        # Each arm holds its own users (the router's split is sticky): tests count users, not rows (`units`).
        features = self.compare(ref_values, cur_values, ref_text, cur_text, tenant=last.tenant,
                                units=(p.stable.ordered_units(), p.canary.ordered_units()))
        return [self._report(deployment, last.app, last.tenant, ref_values, cur_values, cur_times, features,
                             comparison="canary_vs_stable", release=p.canary_release,
                             reference_release=p.stable_release, served=True,
                             reference_window_start=_time(ref_times.min()),
                             reference_window_end=_time(ref_times.max()))]

    def report(self, deployment: str, w: Windows, *, served: bool = True) -> DriftReport:
        """Compare the current window with the reference, feature by feature."""
        ref_values, ref_times = w.ref.values[:w.ref.n], w.ref.times[:w.ref.n]
        cur_values, cur_times, cur_text = w.cur.ordered()
        features = self.compare(ref_values, cur_values, w.text_ref.ordered()[2], cur_text, tenant=w.tenant,
                                app="" if served else w.app)
        # The reference's span too: the router and the gate act after a promotion only on a report whose
        # reference (and window) are all of the promoted release's traffic.
        return self._report(deployment, w.app, w.tenant, ref_values, cur_values, cur_times, features, served=served,
                            reference_window_start=_time(ref_times.min()),
                            reference_window_end=_time(ref_times.max()))

    def _report(self, deployment: str, app: str, tenant: str, ref: np.ndarray, cur: np.ndarray, times: np.ndarray,
                features: list[FeatureDrift], **kw: str | bool | datetime) -> DriftReport:
        texts = any(f.feature in TEXTS for f in features)
        return DriftReport(
            deployment=deployment, app=app, tenant=tenant, source="lockgate-drift",
            window_start=_time(times.min()), window_end=_time(times.max()),
            reference_n=len(ref), current_n=len(cur), features=features,
            drifted=any(f.drifted for f in features),
            embedder=self.embedder.name if texts and self.embedder is not None else "", **kw)

    def compare(self, ref: np.ndarray, cur: np.ndarray, ref_text: np.ndarray | None = None,
                cur_text: np.ndarray | None = None, *, tenant: str = DEFAULT_TENANT,
                app: str = "", units: tuple[np.ndarray, np.ndarray] | None = None) -> list[FeatureDrift]:
        """Every feature measured in both windows (numeric, categorical, then texts); categories named from the
        table of the tenant's application (app '': of its served events). With `units` (each row's, of either
        window: a canary's and its stable's) a test's verdict is also the units' (`_by_units`)."""
        out = []
        labels = self.labels.get((tenant, app), {})
        nobody = (np.full(len(ref), math.nan), np.full(len(cur), math.nan))  # each row its own unit
        ref_units, cur_units = units if units is not None else nobody
        for j, name in enumerate(FEATURES):
            present_r, present_c = ~np.isnan(ref[:, j]), ~np.isnan(cur[:, j])
            r, c = ref[present_r, j], cur[present_c, j]
            if len(r) and len(c):
                u = (ref_units[present_r], cur_units[present_c])
                out.append(self._categorical(name, r, c, labels, u) if KINDS[name] == "cat"
                           else self._numeric(name, r, c, u))
        if self.dim and ref_text is not None and cur_text is not None:
            for t, name in enumerate(TEXTS):
                f = _text(name, ref_text[:, t], cur_text[:, t], units)
                if f is not None:
                    out.append(f)
        return out

    def _numeric(self, name: str, r: np.ndarray, c: np.ndarray,
                 units: tuple[np.ndarray, np.ndarray]) -> FeatureDrift:
        # Values near the float limit (a score of 1e308 is valid JSON) overflow a mean or a spread to inf or
        # NaN, which JSON cannot carry: the report could not be decoded anywhere. The tests are scale-free,
        # so such windows are compared in units of their largest value and the means scaled back.
        scale = max(float(np.max(np.abs(r))), float(np.max(np.abs(c))))
        if scale > _HUGE:
            r, c = r / scale, c / scale
        else:
            scale = 1.0
        ks_stat, ks_p = stats.ks(r, c)
        t = _by_units(stats.drift_test(r, c, "num"), r, c, units)
        # Few distinct values (a 0/1 score): deciles would put them all in one bin, so PSI is over the values.
        psi = stats.categorical(r, c)[0] if t.test in stats.CATEGORICAL_TESTS else stats.psi(r, c, self.bins)
        # The test says a shift is real, PSI that it is material: a small p-value alone does not override a low PSI,
        # as large windows make immaterial shifts significant and a rollback costs too. (Probe p46 F2's flood hid a
        # canary through bins that could not see it, fixed in stats.cuts; its KS p-value was 0.01, not small.)
        return FeatureDrift(feature=name, psi=psi, ks_stat=ks_stat, ks_pvalue=ks_p,
                            reference_mean=float(r.mean()) * scale, current_mean=float(c.mean()) * scale,
                            drifted=t.drifted and psi >= self.psi_threshold, **_test_fields(t))

    def _categorical(self, name: str, r: np.ndarray, c: np.ndarray, labels: Mapping[float, str],
                     units: tuple[np.ndarray, np.ndarray]) -> FeatureDrift:
        psi, chi2, p, top, share_ref, share_cur = stats.categorical(r, c)
        label = labels.get(top, f"#{int(top):x}")
        t = _by_units(stats.drift_test(r, c, "cat"), r, c, units)
        return FeatureDrift(feature=f"{name}:{label or '(none)'}", psi=psi, ks_stat=chi2, ks_pvalue=p,
                            reference_mean=share_ref, current_mean=share_cur,
                            drifted=t.drifted and psi >= self.psi_threshold, **_test_fields(t))


def _time(t: float) -> datetime:
    return datetime.fromtimestamp(float(t), UTC)


def same_time(stable: np.ndarray, canary: np.ndarray) -> bool:
    """Whether two windows' rows (their times) cover the same time: the overlap of their spans is at least
    MIN_OVERLAP of the longer span. Windows.Pair keeps them so; rows restored from before it did, or arms that
    took turns rather than shared the traffic, are never compared (a change of workload between two times
    would read as the canary's drift)."""
    lo, hi = max(stable.min(), canary.min()), min(stable.max(), canary.max())
    longest = max(stable.max() - stable.min(), canary.max() - canary.min())
    return bool(hi >= lo and (longest == 0 or hi - lo >= MIN_OVERLAP * longest))


def _test_fields(t: stats.StatTest) -> dict[str, object]:
    return {"test": t.test, "statistic": t.statistic, "p_value": t.p_value, "threshold": t.threshold,
            "test_drifted": t.drifted, "reference_size": t.reference_n, "current_size": t.current_n}


def _by_units(t: stats.StatTest, r: np.ndarray, c: np.ndarray, units: tuple[np.ndarray, np.ndarray]) -> stats.StatTest:
    """A test's verdict with users as the unit: where some user holds several of the rows, drift only if the
    windows, each user weighing one, also part further than random splits of the users between them part them
    (stats.unit_pvalue), and the p-value the larger of the two. Sticky bucketing puts whole users on one arm and a
    user's answers are alike, so an identical canary serving other users drifted by the rows' test (probe p81 F1:
    100-200 users whose answers differ in length, 5 of 14 identical canaries aborted for output_tokens). With one row
    per user (or no users) the row-level verdict stands as it was; a test that found no drift is not run again."""
    if not t.drifted or not stats.clustered(*units):
        return t
    p = stats.unit_pvalue(r, c, *units, t.test)
    return dataclasses.replace(t, drifted=p < stats.ALPHA,
                               p_value=None if t.p_value is None else max(t.p_value, p))


def _text(name: str, ref: np.ndarray, cur: np.ndarray,
          units: tuple[np.ndarray, np.ndarray] | None) -> FeatureDrift | None:
    """A text feature: never `drifted` (a new model rewords answers by design); its test is evidence a
    gate policy can act on, its permutations of whole units (text.mean_distance_test). Means are the mean
    embeddings' norms (how concentrated the topics are)."""
    keep_r, keep_c = ~np.isnan(ref[:, 0]), ~np.isnan(cur[:, 0])
    r, c = ref[keep_r], cur[keep_c]
    t = text.mean_distance_test(r, c, *((units[0][keep_r], units[1][keep_c]) if units is not None else ()))
    if t is None:
        return None
    return FeatureDrift(feature=name, psi=0.0, ks_stat=t.statistic, ks_pvalue=t.p_value or 1.0,
                        reference_mean=float(np.linalg.norm(r.mean(axis=0))),
                        current_mean=float(np.linalg.norm(c.mean(axis=0))), drifted=False, **_test_fields(t))
