"""The order the gatekeeper signs into a decision (`seq`, Stored.next_seq): above the decision it is stored over and
above every revision its key had, so a release's decisions keep rising whoever made the one before."""

from __future__ import annotations

import pytest

from lockgate.contracts import GateDecided
from lockgate.services.gatekeeper.records import Stored


def _decided(seq: int = 0) -> GateDecided:
    return GateDecided(release="a", decision="PASS", rules=[], seq=seq)


@pytest.mark.parametrize(("stored", "seq"), [
    (Stored(None, 0), 1),  # the release's first decision
    (Stored(_decided(seq=12), 12), 13),  # over the gatekeeper's own: the one before's + 1
    (Stored(_decided(), 40), 41),  # over one signed before decisions carried a seq: above its revision
    (Stored(None, 57, "is about 'b'"), 58),  # over a value that is no decision of the release
    (Stored(None, 0, deleted=90), 91),  # over a deleted key: above its delete marker
    (Stored(_decided(seq=500), 70), 501),  # over one whose seq is above its revision (a bucket made anew)
])
def test_a_decision_is_ordered_above_what_it_is_stored_over(stored: Stored, seq: int) -> None:
    assert stored.next_seq == seq
