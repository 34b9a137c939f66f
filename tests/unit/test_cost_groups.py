"""The dimensions a cost rollup groups by: a release with the app whose calls named it, an app or a release with
its tenant. Grouped by release and tenant only, any app of a tenant added its calls to another app's release
(probe p6, F1)."""

from __future__ import annotations

import pytest

from lockgate.services.query.cost import groups


@pytest.mark.parametrize(("by", "made"), [
    ([], []),
    (["tenant"], ["tenant"]),
    (["deployment", "day"], ["deployment", "day"]),
    (["app"], ["tenant", "app"]),
    (["release"], ["tenant", "app", "release"]),
    (["tenant", "release"], ["tenant", "app", "release"]),
    (["model", "release", "day"], ["tenant", "model", "app", "release", "day"]),
    (["release", "app"], ["tenant", "release", "app"]),  # asked for: kept where it was asked
    (["release", "release"], ["tenant", "app", "release"]),
])
def test_a_release_is_grouped_with_its_app_and_an_app_or_a_release_with_its_tenant(by: list[str],
                                                                                     made: list[str]) -> None:
    assert groups(by) == made
