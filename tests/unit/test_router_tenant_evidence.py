"""A deployment's canary evidence is its own tenant's answers and those its releases served (its tenant's keys' and
admin keys'): another tenant's answers under its name (the default route's, release-less, under passthrough) are
neither its served events nor its scores, which a release-less score once counted as stable's (probe p25 F2).
Through the real router and evaluator in tests/integration/test_router_tenant_evidence.py."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from lockgate.contracts import InferenceEvent, InferenceScored
from lockgate.services.router.rollouts import Rollouts
from tests.unit.test_router_diverted import _rollouts

pytestmark = pytest.mark.timeout(30)
AT = datetime.fromtimestamp(150, UTC)  # after the rollout's start (100)


def _of(tmp_path: Path, owner: str) -> Rollouts:
    """Deployment `d` (canary r2, stable r1) serving `owner`'s releases ("": a route stored before tenants were)."""
    rollouts = _rollouts(tmp_path)
    route = rollouts.routes["d"]
    assert route.canary is not None
    rollouts.routes["d"] = msgspec.structs.replace(route, stable=msgspec.structs.replace(route.stable, tenant=owner),
                                                   canary=msgspec.structs.replace(route.canary, tenant=owner))
    return rollouts


def _score(tenant: str, release: str, variant: str = "stable") -> InferenceScored:
    return InferenceScored(event_id=f"{tenant}-{release}-{variant}", app="d", deployment="d", variant=variant,
                           release=release, scores={"length": 6.0}, served=True, tenant=tenant, time=AT)


def _event(tenant: str, release: str, variant: str = "stable") -> InferenceEvent:
    return InferenceEvent(app="d", deployment="d", variant=variant, release=release, tenant=tenant, time=AT)


# (tenant, release): the owner's answers of either arm; an admin key of another tenant served by stable (the route's
# own release); another tenant's answer by the default route under the deployment's name (no release).
ANSWERS = [("default", "r1"), ("default", "r2"), ("acme", "r1"), ("acme", "")]


@pytest.mark.parametrize(("owner", "kept"), [
    ("default", {("default", "r1"), ("default", "r2"), ("acme", "r1")}),
    ("", set(ANSWERS)),  # a route stored before targets recorded their tenant takes every answer, as before
])
def test_only_the_owners_answers_and_those_its_releases_served_are_its_scores(
        tmp_path: Path, owner: str, kept: set[tuple[str, str]]) -> None:
    rollouts = _of(tmp_path, owner)
    rollouts.observe_scores([_score(tenant, release) for tenant, release in ANSWERS])
    held = {e for release in ("r1", "r2") for e in rollouts.evidence._scores.get(("d", release), {}).get("length", {})}
    assert held == {f"{tenant}-{release}-stable" for tenant, release in kept}
    # A release-less score counts as stable's only when it is the owner's (or the owner is not known).
    stable = rollouts.evidence._scores.get(("d", "r1"), {}).get("length", {})
    assert ("acme--stable" in stable) == (owner == "")


def test_only_the_owners_answers_and_those_its_releases_served_are_its_events(tmp_path: Path) -> None:
    rollouts = _of(tmp_path, "default")
    rollouts.observe([_event(tenant, release) for tenant, release in ANSWERS])
    counts = {release: rollouts.evidence.count("d", release, 100.0) for release in ("r1", "r2")}
    assert counts == {"r1": 2, "r2": 1}  # default's and the admin key's on r1, default's on r2
