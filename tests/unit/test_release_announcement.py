"""A release's announcement is named by its binding: announcing a binding again (after a crash or bus error between
binding and announcing) is the same event, which JetStream and the sink keep once."""

from __future__ import annotations

import pytest

from lockgate import artifacts
from lockgate.contracts import ReleaseRegistered
from lockgate.identity import bundle_content
from lockgate.ids import content_hash

ARTS = {"prompt/p": "sha256:" + "a7" * 32}


def _digest(release: str, artifacts_: dict[str, str], author: str = "") -> str:
    bundle = artifacts.release_bundle(release, "shop", artifacts_)
    if author:  # as sign_bundle adds it: an author is not content
        bundle["author"] = {"name": author, "key_id": "k", "signature": "s"}
    return content_hash(bundle_content(bundle))


def test_every_announcement_of_one_binding_has_one_id_whoever_registers_it() -> None:
    first = artifacts.announcement_id("shop-v1", _digest("shop-v1", ARTS, author="olly"))
    assert first == artifacts.announcement_id("shop-v1", _digest("shop-v1", ARTS, author="ann"))
    assert first == artifacts.announcement_id("shop-v1", _digest("shop-v1", ARTS))
    assert ReleaseRegistered(id=first, release="shop-v1", app="shop", artifacts=ARTS).id == first  # a valid event id


@pytest.mark.parametrize(("release", "arts"), [
    ("shop-v2", ARTS),  # another name
    ("shop-v1", {"prompt/p": "sha256:" + "b8" * 32}),  # other content (refused under a bound name, never announced)
])
def test_another_binding_is_another_announcement(release: str, arts: dict[str, str]) -> None:
    assert (artifacts.announcement_id(release, _digest(release, arts))
            != artifacts.announcement_id("shop-v1", _digest("shop-v1", ARTS)))
