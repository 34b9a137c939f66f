"""The dimensions a cost rollup groups by: a deployment or a release with the app whose calls named it, an app, a
deployment or a release with its tenant. Grouped by release and tenant only, any app of a tenant added its calls to
another app's release (probe p6, F1); grouped by deployment alone, any tenant's app added its calls to another
tenant's deployment (probe p73, F1)."""

from __future__ import annotations

import pytest

from lockgate.services.query.cost import groups


@pytest.mark.parametrize(("by", "made"), [
    ([], []),
    (["tenant"], ["tenant"]),
    (["model", "day"], ["model", "day"]),
    (["deployment", "day"], ["tenant", "app", "deployment", "day"]),
    (["model", "deployment", "release"], ["tenant", "model", "app", "deployment", "release"]),
    (["tenant", "app", "deployment", "day"], ["tenant", "app", "deployment", "day"]),
    (["app"], ["tenant", "app"]),
    (["release"], ["tenant", "app", "release"]),
    (["tenant", "release"], ["tenant", "app", "release"]),
    (["model", "release", "day"], ["tenant", "model", "app", "release", "day"]),
    (["release", "app"], ["tenant", "release", "app"]),  # asked for: kept where it was asked
    (["release", "release"], ["tenant", "app", "release"]),
])
def test_a_deployment_or_release_is_grouped_with_its_app_and_each_with_its_tenant(by: list[str],
                                                                                   made: list[str]) -> None:
    assert groups(by) == made
